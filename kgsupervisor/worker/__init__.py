"""The child process: one worker's poll, claim, POST and write-back loop, and its shared counters."""
