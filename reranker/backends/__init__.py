"""Model backends: everything that touches a model runtime lives below here."""
