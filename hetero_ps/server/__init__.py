"""The master: ``python -m hetero_ps.server`` — parameters, optimizer, scheduler, aggregation."""
