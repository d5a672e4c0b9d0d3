"""ploop: the ploop disk format (images and DiskDescriptor.xml) and ploop volumes on any
kernel: attached with native ploop when it is there, through qemu-nbd and NBD otherwise.

    vol = ploop.create_or_open("/share/vols/v1", 10 << 30)   # the directory and its disk
    att = ploop.attach(vol.directory)                        # att.device: /dev/nbd0
    att = ploop.find_attached("/share/vols/v1")              # from any later process
    att.detach()
    ploop.grow("/share/vols/v1", 20 << 30)

ploop.image works on image files, ploop.descriptor on DiskDescriptor.xml. Errors are OSError
subclasses carrying errno and the path concerned (see ploop.errors).
"""

from .errors import (CorruptImage, DescriptorError, ImageBusy, InvalidArgument, PloopError,
                     SizeMismatch, ToolError, UnsupportedImage)
from .volume import (Attachment, Volume, attach, create_or_open, detach, find_attached, grow,
                     open_volume)

__all__ = [
    "Attachment", "Volume", "attach", "create_or_open", "detach", "find_attached", "grow",
    "open_volume",
    "PloopError", "CorruptImage", "DescriptorError", "ImageBusy", "InvalidArgument",
    "SizeMismatch", "ToolError", "UnsupportedImage",
]
