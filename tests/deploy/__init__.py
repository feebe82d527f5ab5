"""Offline checks of the images, docker compose files and Kubernetes manifests."""
