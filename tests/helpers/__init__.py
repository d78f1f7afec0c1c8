"""Test helpers: conditional marks (`RunIf`), callbacks that report what a run did (`probe`), and
Lightning pieces that configs can name (`lightning`: `+callbacks.log._target_=tests.helpers.lightning.EpochLog`)."""
