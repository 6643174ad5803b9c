"""tandem's benchmarks. The serving benchmark (`tandem bench`) is the package
`benchmarks.serving`; the other files here are scripts run from this folder."""
