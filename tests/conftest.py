import logging

# dp_accounting logs a warning for every fractional order its series fails on; the tests check those cases.
logging.getLogger("absl").setLevel(logging.ERROR)
