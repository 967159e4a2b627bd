"""What ships around the code: the wheel, the container, Kubernetes, systemd, the dashboard, and config mistakes in real runs."""
