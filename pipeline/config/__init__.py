"""params.yaml as dataclasses, checked by key; `models:` checked against the registry."""
