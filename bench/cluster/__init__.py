"""Several Conveyor nodes on one PostgreSQL: ``python -m bench.cluster`` (bench.cluster.run)."""
