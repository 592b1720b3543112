"""The HTTP layer: schemas, routes and the error table. No model runtime is imported here."""
