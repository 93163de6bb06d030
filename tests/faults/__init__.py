"""The fault suite: payler's promises (nothing lost, at worst a duplicate, bad input never fatal)
tested against kills, signals, broker and storage outages, failovers and fuzzed input.

- ``servers.py``: servers of the suite's own (a RabbitMQ node, Redis servers) that a scenario
  may stop, kill and fail over; the shared ones are never touched.
- ``harness.py``: payler as a daemon (the CLI, in a subprocess), the test's broker client, the
  exact count of every message by id, and the table's rows.
- ``kafka.py``: Kafka topics read in the background, from their beginning.
- ``fuzzing.py``: hypothesis strategies of AMQP messages, Kafka records and stream entries, and
  what "delivered intact" means for each.
- ``test_*.py``: the scenarios; each appends its row (``record``), which ``benchmarks/soak.py``
  and the terminal summary print as a table.

Decisions, for whoever adds a scenario:

- A scenario counts *by id*, never by totals: every message has a unique message id, and at the
  end the destination, the dead-letter queue, the source and the spool are drained or read.
  ``lost`` must be 0; duplicates are allowed only where the README says (a kill or an outage
  between a publish and its spool delete: at most one delivery batch each).
- Waiting is polling with a deadline (``wait_until``); a scenario stops waiting once nothing has
  moved for ``STALL_S``, and then the count says where everything is. The only sleeps are a
  fault's own length (a Redis outage of 20 s).
- A scenario that shows a defect still open is kept exactly as it should pass and marked
  ``xfail(strict=True, reason="issue N defect M: ...")``: remove the mark with the fix.
- Sizes: :data:`tests.faults.conftest.BOUNDED` in CI, :data:`~tests.faults.conftest.FULL` with
  ``--full-faults`` (and ``benchmarks/soak.py --full``).
"""
