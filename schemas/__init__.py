"""Arrow schemas and config models shared by every stage."""
