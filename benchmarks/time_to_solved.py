"""The head-to-head against SB3's zoo-tuned SAC, TQC and CrossQ is a study: `python -m lab.head_to_head`."""
import shlex
import sys

if __name__ == "__main__":
    print(f"benchmarks/time_to_solved.py moved: python -m lab.head_to_head {shlex.join(sys.argv[1:])}".rstrip(),
          file=sys.stderr)
    sys.exit(2)
