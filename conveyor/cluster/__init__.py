"""Several Conveyor nodes on one PostgreSQL: membership, leases, ownership (issue 12)."""
