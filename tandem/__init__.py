"""tandem: one JAX transformer, trained sharded over a device mesh and served over gRPC.

Packages: `tandem.kernels` <- `tandem.model` <- `tandem.train`, `tandem.serve`
(`tandem.proto` <- `tandem.serve`); `tandem.config` is the config layer every one of them
uses and `tandem.cli` the `tandem` command. WORKSPACE.md is the map.
"""
