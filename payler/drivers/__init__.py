"""Drivers: the parts that talk to brokers (``brokers/``) and spool storages (``storages/``)."""
