"""Helpers shared by pdserve's tests (on sys.path through pytest's ``pythonpath``; never
installed): stand-ins for workers and the router, the e2e deployment helpers and the HF
reference, kernel test cases."""
