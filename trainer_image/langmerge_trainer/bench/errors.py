"""The benchmark's own error: a bad option, missing data, a failed run. The CLI prints it without a traceback."""


class BenchError(RuntimeError):
    pass
