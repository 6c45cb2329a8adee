"""sendmail-shim: a drop-in sendmail for shared web hosting.

The mail's life, one module per stage:

    invocation.py  the sendmail command line
    message.py     the message read from stdin (addresses.py parses every address)
    accounts.py    the sending account and the caller
    spf.py         the sender domain's SPF record
    ledger.py      rate-limit reservations
    relay.py       SMTP with verified STARTTLS to the upstream
    queue.py       durable retry after a temporary failure
    pipeline.py    the stages in order; exitcodes.py turns each refusal into an exit code
"""

__version__ = "0.1.0"
