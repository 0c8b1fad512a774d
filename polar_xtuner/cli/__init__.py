"""What every command line shares: the process set-up and exit codes (:mod:`.entry`), the flag types (:mod:`.flags`)."""
