"""Test helpers: conditional marks (`run_if.RunIf`), callbacks that report what a run did (`probe`),
and Lightning pieces that configs can name (`lightning`, e.g. `tests.helpers.lightning.EpochLog`)."""
