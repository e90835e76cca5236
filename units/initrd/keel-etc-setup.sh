#!/bin/sh
# keel: populate /etc on the root partition from the image's factory defaults (first boot only).
set -eu
if [ -e /sysroot/etc ]; then
    exit 0
fi
rm -rf /sysroot/.keel-etc-new
cp -a /sysusr/usr/share/factory/etc /sysroot/.keel-etc-new
sync -f /sysroot/.keel-etc-new
mv -T /sysroot/.keel-etc-new /sysroot/etc
echo "keel: populated /etc from /usr/share/factory/etc" > /dev/kmsg
