"""HTTP blueprints, one per area; handlers parse and validate, call `utils`, return JSON."""
