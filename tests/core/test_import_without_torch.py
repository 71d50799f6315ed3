import subprocess
import sys
import textwrap


def test_core_imports_and_runs_where_torch_cannot_be_imported():
    code = textwrap.dedent(
        """
        import importlib.abc, sys

        class Forbid(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"torch", "numpy", "transformers"}:
                    raise ImportError(f"{name} is forbidden in this test")
                return None

        sys.meta_path.insert(0, Forbid())
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("the import guard did not work")

        from neuronserve.core import CacheConfig, Request, Scheduler, SchedulerConfig
        s = Scheduler(SchedulerConfig(), CacheConfig())
        s.add_request(Request("a", [1, 2, 3], max_tokens=2))
        out = s.schedule()
        s.update(out, {"a": 5})
        assert out.num_new_tokens == [3]
        assert not any(m.split(".")[0] in {"torch", "numpy"} for m in sys.modules)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
