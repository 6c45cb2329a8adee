"""``python -m sendmail_shim.gate [--user USER]``: the gate with the usual config file."""

from sendmail_shim.gate.service import main

if __name__ == "__main__":
    main()
