#!/bin/sh
# On a trial boot of a new version (systemd-boot counted it: LoaderBootCountPath is set) nobody
# is expected at the console: instead of a shell or a prompt, say why and reboot, and the boot
# loader's counter brings back the previous version. On any other boot, do nothing (exit 0), so
# the emergency shell or the recovery prompt follows as usual.
set -u
var=/sys/firmware/efi/efivars/LoaderBootCountPath-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f
[ -e "$var" ] || exit 0
msg="keel: the trial boot of a new version failed (${1:-it reached the emergency target}); rebooting in 10 s, the boot loader then starts the previous version"
echo "$msg" >&2
echo "$msg" > /dev/console 2>/dev/null || true
sleep 10
systemctl --force reboot
# Still here (systemd refused): force it.
sleep 30
systemctl --force --force reboot
