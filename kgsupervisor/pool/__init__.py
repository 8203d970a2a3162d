"""The parent process: the supervisor that forks, watches and respawns the workers."""
