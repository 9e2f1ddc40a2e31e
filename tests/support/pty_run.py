#!/usr/bin/env python3
"""Runs a command on a new pseudo-terminal and plays the person at it.

    python3 pty_run.py [--answer PROMPT TEXT]... -- PROGRAM ARGS...

For each --answer, in order: waits until PROMPT appears in the output, then
until the terminal no longer echoes (the program reads without echo), then
types TEXT and Enter. Afterwards reads everything until the program exits.
Prints the whole transcript (everything the program wrote to the terminal)
on standard output and exits with the program's exit status; 124 if a
prompt did not appear, or the program did not exit, within 30 seconds.

Used by tests/secrets_cli.rs: standard input, output and error of PROGRAM
are the terminal, so `postern` sees a person there.
"""
import os
import pty
import select
import sys
import termios
import time

TIMEOUT = 30.0


def main():
    args = sys.argv[1:]
    if "--" not in args:
        sys.exit("usage: pty_run.py [--answer PROMPT TEXT]... -- PROGRAM ARGS...")
    split = args.index("--")
    options, command = args[:split], args[split + 1:]
    answers = []
    while options:
        if options[0] != "--answer" or len(options) < 3:
            sys.exit("usage: pty_run.py [--answer PROMPT TEXT]... -- PROGRAM ARGS...")
        answers.append((options[1].encode(), options[2].encode()))
        options = options[3:]

    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.execvp(command[0], command)
        finally:
            os._exit(127)

    transcript = bytearray()
    deadline = time.monotonic() + TIMEOUT

    def read_some(wait):
        """Reads what is there within `wait` seconds; False at end of output."""
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            return True
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the program closed the terminal
            return False
        if not chunk:
            return False
        transcript.extend(chunk)
        return True

    def give_up(why):
        sys.stdout.buffer.write(bytes(transcript))
        sys.stdout.buffer.write(f"\n[pty_run: {why}]\n".encode())
        sys.stdout.flush()
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        sys.exit(124)

    seen = 0
    for prompt, text in answers:
        while prompt not in transcript[seen:]:
            if time.monotonic() > deadline:
                give_up(f"no prompt {prompt.decode()!r} within {TIMEOUT}s")
            if not read_some(0.1):
                give_up(f"the program ended before prompting {prompt.decode()!r}")
        seen = transcript.index(prompt, seen) + len(prompt)
        while termios.tcgetattr(fd)[3] & termios.ECHO:
            if time.monotonic() > deadline:
                give_up(f"the terminal still echoes after {prompt.decode()!r}")
            read_some(0.01)
        os.write(fd, text + b"\r")

    while read_some(0.1):
        if time.monotonic() > deadline:
            give_up(f"the program did not exit within {TIMEOUT}s")
    _, status = os.waitpid(pid, 0)
    sys.stdout.buffer.write(bytes(transcript))
    sys.stdout.flush()
    sys.exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
