"""A memkv server as a child process of a script (the demos): start, wait until it listens, stop."""
import os
import re
import subprocess
import sys
import time


class LocalServer:
    def __init__(self, data: str, *extra_args: str):
        self.data = data
        self.extra_args = list(extra_args)
        self.log_path = os.path.join(data, "server.log")
        os.makedirs(data, exist_ok=True)

    def start(self) -> float:
        """Start `memkv serve` on a free loopback port; returns the seconds it took to listen."""
        t0 = time.monotonic()
        self.log = open(self.log_path, "a")
        start = os.path.getsize(self.log_path)
        self.proc = subprocess.Popen([sys.executable, "-m", "memkv_nixl.cli", "serve", "--data",
                                      self.data, "--listen", "127.0.0.1:0", *self.extra_args],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(self.log_path) as f:
                f.seek(start)
                text = f.read()
            m = re.search(r"memkv serving on (\S+)", text)
            if m:
                self.address = m.group(1)
                self.endpoint = "memkv://" + self.address
                # its unix socket, where it has one (same-host clients: cma)
                u = re.search(r"memkv also listening on (memkv\+unix://\S+)", text)
                self.unix_endpoint = u.group(1) if u else None
                return time.monotonic() - t0
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit(f"memkv server did not start; see {self.log_path}")

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        self.proc.wait(60)
        self.log.close()
