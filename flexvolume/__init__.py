"""The Kubernetes FlexVolume driver: image files on a shared filesystem as pod volumes.

Kubelet runs the installed driver once per call (see flexvolume.driver); nothing here is
imported on its start-up path but what that call needs.
"""
