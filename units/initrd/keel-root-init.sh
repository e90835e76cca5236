#!/bin/sh
# keel: create the node's TPM-sealed root volume (first boot only). See docs/trusted-boot.md.
set -eu
WITHOUT_TPM=@WITHOUT_TPM@
say() { echo "keel-root-init: $*"; echo "<5>keel-root-init: $*" > /dev/kmsg; }
fail() { echo "keel-root-init: ERROR: $*" >&2; echo "<2>keel-root-init: ERROR: $*" > /dev/kmsg; exit 1; }

# Sets $known to the names of the partitions the kernel knows now (" vda1 vda2 ...").
list_partitions() {
    known=""
    for q in /sys/class/block/*/partition; do
        [ -e "$q" ] || continue
        q=${q%/partition}
        known="$known ${q##*/}"
    done
}

# Every boot after the first: the volume exists and is finished, and there is nothing to do. This
# unit is not ordered after systemd-repart, so on those boots the root is unlocked while /usr is
# still being set up. Wait until udev has handled every partition the kernel knows of (so the
# volume, if there is one, has its /dev/gpt-auto-root-luks name), then leave if it is there. A
# disk that shows up later, or none at all, leads to the first-boot path below, which waits for
# systemd-repart and checks again.
list_partitions
parts=""
for n in $known; do
    parts="$parts /dev/$n"
done
# udev names the root partition (/dev/gpt-auto-root) from a property of the whole disk that it
# computes when it probes the disk. systemd-repart adds the partition to a disk that is in use
# (BLKPG), and udev learns of it through two events: the new partition's, and a change of the
# disk when repart closes it. When the partition's event is handled first, the partition is
# never named (seen once in some thirty first boots: the boot stopped here). Asking udev to
# probe the disk again, then its partitions, names it.
reprobe() {
    disks=""
    for q in /sys/class/block/*/partition; do
        [ -e "$q" ] || continue
        disk=$(readlink -f "${q%/partition}") || continue
        disk=${disk%/*}
        disk=${disk##*/}
        case " $disks " in *" $disk "*) ;; *) disks="$disks $disk" ;; esac
    done
    devs=""
    for disk in $disks; do
        devs="$devs /dev/$disk"
        for q in /sys/class/block/"$disk"/*/partition; do
            [ -e "$q" ] || continue
            q=${q%/partition}
            devs="$devs /dev/${q##*/}"
        done
    done
    # shellcheck disable=SC2086
    [ -z "$devs" ] || udevadm trigger --action=change --settle $devs > /dev/null 2>&1 || true
}
root_seen() { [ -e /dev/gpt-auto-root ] || [ -e /dev/gpt-auto-root-luks ]; }
if [ -n "$parts" ]; then
    # shellcheck disable=SC2086
    udevadm wait --timeout=60 $parts > /dev/null 2>&1 || true
fi
if [ -e /dev/gpt-auto-root-luks ]; then
    # The label udev's blkid builtin read when it named the device: no second probe of the disk.
    label=$(udevadm info -q property --property=ID_FS_LABEL --value /dev/gpt-auto-root-luks || true)
    [ "$label" != keel-root ] || exit 0
fi
# First boot: systemd-repart creates the partition once /usr is mounted. Wait for it to finish
# (this joins the boot's own start job for it).
systemctl start systemd-repart.service || fail "systemd-repart failed; see journalctl -u systemd-repart"
udevadm settle -t 30 || true
if ! root_seen; then
    say "udev has not named the new root partition; probing the boot disk again"
    reprobe
fi
i=0
while ! root_seen; do
    i=$((i + 1))
    if [ "$i" -gt 120 ]; then
        list_partitions
        fail "no root partition on the boot disk after 60 s (systemd-repart did not create one, or udev did not name it; partitions the kernel knows:${known:- none}; is the disk full?)"
    fi
    [ $((i % 20)) -ne 0 ] || reprobe
    sleep 0.5
done
if [ -e /dev/gpt-auto-root-luks ]; then
    DEV=$(readlink -f /dev/gpt-auto-root-luks)
    label=$(cryptsetup luksDump "$DEV" | sed -n 's/^Label:[[:space:]]*//p')
    [ "$label" = keel-root-new ] || exit 0
    say "$DEV holds an unfinished root volume from an interrupted first boot; creating it again"
else
    DEV=$(readlink -f /dev/gpt-auto-root)
    fstype=$(blkid -p -o value -s TYPE "$DEV" || true)
    [ -z "$fstype" ] || fail "root partition $DEV holds a $fstype file system, not a LUKS2 volume; this image keeps /etc and /var only in a TPM-sealed volume (wipe the partition to start over: its data cannot be used)"
fi

umask 077
mkdir -p /run/keel
# libcryptsetup's lock directory: below, the header is changed (TPM enrolment, recovery key) while
# the volume is opened from it, and the locks keep each of them to a consistent copy.
mkdir -p /run/cryptsetup
KEY=/run/keel/root-init.key
enrol=""
finished=0
cleanup() {
    [ -z "$enrol" ] || { kill "$enrol" 2>/dev/null || true; wait "$enrol" 2>/dev/null || true; }
    rm -f "$KEY" /run/keel/recovery-key
    umount /run/keel/newroot 2>/dev/null || true
    [ "$finished" = 1 ] || cryptsetup close root 2>/dev/null || true
}
trap cleanup EXIT
if [ -c /dev/tpmrm0 ]; then
    TPM=1
    head -c 64 /dev/urandom > "$KEY"
else
    TPM=0
    if [ "$WITHOUT_TPM" != unencrypted ]; then
        fail "no TPM2 device: this image never stores node state unsealed (trust.without-tpm = \"refuse\"); boot it with a TPM 2.0, or build with trust.without-tpm = \"unencrypted\""
    fi
    say "WARNING: no TPM2 device; creating the root volume WITHOUT protection (empty passphrase) because the image sets trust.without-tpm = \"unencrypted\""
    : > "$KEY"
fi
say "creating the LUKS2 root volume on $DEV"
cryptsetup luksFormat -q --type luks2 --label keel-root-new --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file "$KEY" "$DEV"
if [ "$TPM" = 1 ]; then
    if [ ! -r /.extra/tpm2-pcr-public-key.pem ] || [ ! -r /.extra/tpm2-pcr-signature.json ]; then
        fail "the UKI carries no .pcrpkey/.pcrsig: it was not built with keel's signing keys"
    fi
    say "sealing the volume key to the TPM under the operator's signed PCR 11 policy"
    # The enrolments run while the volume is opened and its file system made (two CPUs, and the
    # TPM works apart from both).
    (
        systemd-cryptenroll --unlock-key-file="$KEY" --tpm2-device=auto --tpm2-pcrs= \
            --tpm2-public-key=/.extra/tpm2-pcr-public-key.pem --tpm2-public-key-pcrs=11 \
            --tpm2-signature=/.extra/tpm2-pcr-signature.json "$DEV" \
            || fail "sealing the volume key to the TPM failed"
        systemd-cryptenroll --unlock-key-file="$KEY" --recovery-key "$DEV" > /run/keel/recovery-key 2> /run/keel/recovery-key.log \
            || { cat /run/keel/recovery-key.log >&2; fail "adding the recovery key failed"; }
    ) &
    enrol=$!
    # Opened as systemd-cryptsetup@root opens it on every later boot, under the same name and
    # with the volume key measured into PCR 15, so this boot's PCR 15 is the same as theirs. The
    # volume stays open: systemd-cryptsetup@root finds it active and has nothing to do.
    /usr/lib/systemd/systemd-cryptsetup attach root "$DEV" "$KEY" tpm2-measure-pcr=yes,headless=1
else
    cryptsetup open --key-file "$KEY" "$DEV" root
fi
# Inode tables and the journal are zeroed lazily (by the kernel, after boot) instead of being
# written through the cipher now: the volume is new, and a clean journal is never replayed.
mkfs.ext4 -q -L root -E lazy_itable_init=1,lazy_journal_init=1,nodiscard /dev/mapper/root
if [ "$TPM" = 1 ]; then
    mkdir -p /run/keel/newroot
    mount /dev/mapper/root /run/keel/newroot
    # /var and /var/lib with the modes systemd-tmpfiles gives them (this script's umask would
    # make them 0700, and services running as their own user before systemd-tmpfiles-setup,
    # etcd among them, could not reach /var/lib); /var/lib/keel stays private.
    mkdir -m 0755 /run/keel/newroot/var /run/keel/newroot/var/lib
    mkdir -m 0700 /run/keel/newroot/var/lib/keel
    pid=$enrol
    enrol=""
    wait "$pid" || fail "the volume could not be sealed (see above); the next boot starts over"
    grep -v '^$' /run/keel/recovery-key | tail -n 1 > /run/keel/newroot/var/lib/keel/recovery-key
    umount /run/keel/newroot
    # Batch mode needs no remaining passphrase; it still says "Nothing to read on input".
    cryptsetup luksKillSlot -q "$DEV" 0 < /dev/null 2> /run/keel/killslot.log \
        || { cat /run/keel/killslot.log >&2; fail "removing the one-time key slot failed"; }
fi
cryptsetup config --label keel-root "$DEV"
finished=1
# systemd-cryptsetup@root waits for the volume's /dev/gpt-auto-root-luks name.
udevadm trigger --settle "$DEV" || true
if [ "$TPM" = 1 ]; then
    say "root volume sealed to this TPM and opened; recovery key stored in /var/lib/keel/recovery-key (escrow it, then delete it)"
else
    say "root volume created unprotected and opened"
fi
