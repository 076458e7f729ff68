"""`shadow report`: a self-contained HTML report of what the shadow concludes from one mirror stream (recorded
from a real engine, or replayed from a trace by the simulator)."""
