"""HTTP resources: one blueprint module per resource, each exposing `bp`."""
