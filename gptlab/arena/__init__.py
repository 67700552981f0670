"""The arena: two anonymous models answer the same prompt, a judge picks the better answer, and
many such battles become a leaderboard (online Elo and Bradley-Terry with bootstrap intervals).

``battles`` holds the battle record, ``store`` keeps battles in SQLite and trades them with
FastChat's battle JSON, ``ratings`` turns battles into a board, ``judges`` decide battles and
``run`` plays a tournament between model folders. ``gptlab.serve`` may import this package, never
the reverse.
"""
