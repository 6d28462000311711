"""The floor every room stands on: errors, conventions, names, atomic writes, params sections."""
