"""Shared by the fuzzers: one fixed budget and seed (derandomized), so CI runs the same
examples every time and the fuzzers stay within seconds on two CPU cores."""
from hypothesis import HealthCheck, settings

FUZZ = settings(max_examples=60, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
