"""The admin operations, shared by the CLI, the HTTP API and the web console.

They use only the storage and broker contracts (:class:`~payler.drivers.storages.base.
SpoolStorage`, :class:`~payler.drivers.brokers.base.Broker`): nothing reaches around a driver.

- :mod:`payler.admin.target`: which spool, broker and queues the operations work on (from the
  configuration file and the environment, as the daemon does).
- :mod:`payler.admin.views`: what they return and take (pydantic: the API's schema too).
- :mod:`payler.admin.operations`: :class:`~payler.admin.operations.Admin`, the operations.
- :mod:`payler.admin.times`: durations (``500ms``, ``5s``, ``10m``, ``2h``) and due times.
"""
