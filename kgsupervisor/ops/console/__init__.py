"""The operator console: a web page over the queue and the pool (Flask, served by waitress).

Nothing here is imported by the supervisor itself: `run`'s status child and `kgsupervisor
console` import it, so that the supervisor's memory and start-up time do not grow with Flask."""
