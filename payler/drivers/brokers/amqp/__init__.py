"""AMQP 0-9-1 details of the RabbitMQ driver (:mod:`payler.drivers.brokers.rabbitmq`).

- :mod:`.tolerant`: decoding what pamqp cannot, so that one odd message never kills a connection;
- :mod:`.messages`: AMQP messages to payloads (never raising) and payloads to AMQP publishes
  (checked against the connection's ``frame_max``);
- :mod:`.consumer`: consuming one queue with a prefetch window sized to a byte budget, and
  handing refused messages back after a backoff;
- :mod:`.alarms`: RabbitMQ's resource alarms (``Connection.Blocked``) seen by a publisher.
"""
