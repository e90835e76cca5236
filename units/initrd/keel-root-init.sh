#!/bin/sh
# keel: open the node's TPM-sealed root volume, or create it on the first boot, and mark PCR 11
# as soon as it is open. See docs/trusted-boot.md.
set -eu
WITHOUT_TPM=@WITHOUT_TPM@
SIG=/.extra/tpm2-pcr-signature.json
ZERO=0000000000000000000000000000000000000000000000000000000000000000
say() { echo "keel-root-init: $*"; echo "<5>keel-root-init: $*" > /dev/kmsg; }
fail() { echo "keel-root-init: ERROR: $*" >&2; echo "<2>keel-root-init: ERROR: $*" > /dev/kmsg; exit 1; }
TPM=0
[ ! -c /dev/tpmrm0 ] || TPM=1
opened_measured=0

# Extends PCR 11 with a word (on machines with a TPM). keel-root-opened follows every opening of
# the root, however it was opened, before anything on it is read: from then on PCR 11 is past the
# one state whose signed policy releases the sealed key. keel-recovery precedes an opening with
# a typed key, so that boot never reaches a state the operator signed. A failure stops the boot.
measure() {
    [ "$TPM" = 1 ] || return 0
    # SYSTEMD_FORCE_MEASURE: measure even if the stub did not say it measured a UKI (a boot
    # that was not through a signed UKI is in no signed state anyway).
    if ! SYSTEMD_FORCE_MEASURE=1 /usr/lib/systemd/systemd-pcrextend "$1"; then
        cryptsetup close root 2>/dev/null || true
        fail "measuring '$1' into PCR 11 failed; the boot stops, since the root must never be readable while PCR 11 can still release its key"
    fi
}

# Opens $1 as /dev/mapper/root the everyday way: through the TPM, which releases the key only
# under the operator's signed PCR 11 policy with PCR 12 and 13 empty (and PCR 7 as on the first
# boot, when Secure Boot was on); on a machine without a TPM, with the empty passphrase of an
# image built with trust.without-tpm = "unencrypted". Never prompts.
open_sealed() {
    if [ "$TPM" = 1 ]; then
        /usr/lib/systemd/systemd-cryptsetup attach root "$1" - \
            "tpm2-device=auto,tpm2-signature=$SIG,tpm2-measure-pcr=yes,headless=1"
    else
        [ "$WITHOUT_TPM" = unencrypted ] || fail "no TPM2 device: this image never stores node state unsealed (trust.without-tpm = \"refuse\"); boot it with a TPM 2.0, or build with trust.without-tpm = \"unencrypted\""
        : > /run/keel/empty.key
        cryptsetup open --key-file /run/keel/empty.key "$1" root
    fi
}

# The TPM did not release the key: this boot is not the one the operator signed (another
# command line, a changed UKI, Secure Boot switched off, firmware changes, another root volume).
# Only the recovery key opens the volume now, and PCR 11 is moved out of every signed state first.
recover() {
    measure keel-recovery
    # A new version on trial that cannot unlock this root must not wait for a person: reboot
    # (the boot loader's counter then starts the previous version). Returns on other boots.
    /usr/lib/keel/trial-guard "the TPM did not release the root volume's key to this version"
    say "the TPM did not release the key of the root volume $1: this boot is not one the operator signed (changed UKI or command line, Secure Boot or firmware changed, or another disk). Type the recovery key to open it in recovery mode (keel-agent will report this boot untrusted and start no containers), or power off."
    /usr/lib/systemd/systemd-cryptsetup attach root "$1" - "tpm2-measure-pcr=yes" \
        || fail "the root volume $1 was not opened"
    say "root volume opened with a typed key: RECOVERY MODE, this boot is untrusted"
}

# Every boot but the first: open the finished volume, then mark PCR 11.
open_existing() {
    mkdir -p /run/keel /run/cryptsetup
    open_sealed "$1" || recover "$1"
    measure keel-root-opened
    exit 0
}

# Sets $known to the names of the partitions the kernel knows now (" vda1 vda2 ...").
list_partitions() {
    known=""
    for q in /sys/class/block/*/partition; do
        [ -e "$q" ] || continue
        q=${q%/partition}
        known="$known ${q##*/}"
    done
}

# Every boot after the first: the volume exists and is finished, and is opened (open_existing).
# This unit is not ordered after systemd-repart, so on those boots the root is unlocked while
# /usr is still being set up. Wait until udev has handled every partition the kernel knows of (so
# the volume, if there is one, has its /dev/gpt-auto-root-luks name), then open it. A
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
    [ "$label" != keel-root ] || open_existing "$(readlink -f /dev/gpt-auto-root-luks)"
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
mkdir -p /run/keel /run/cryptsetup
if [ -e /dev/gpt-auto-root-luks ]; then
    DEV=$(readlink -f /dev/gpt-auto-root-luks)
    label=$(cryptsetup luksDump "$DEV" | sed -n 's/^Label:[[:space:]]*//p')
    [ "$label" = keel-root-new ] || open_existing "$DEV"
    # A header label is not authenticated: anyone holding the disk can write keel-root-new on
    # a finished root. Only a volume this machine's TPM (or, without a TPM, the empty
    # passphrase) opens is ours; it is finished when it holds a file system, and erased only
    # when it holds none.
    say "$DEV is labelled keel-root-new, as an interrupted first boot leaves the root volume"
    open_sealed "$DEV" || fail "the root volume $DEV is labelled keel-root-new (an unfinished first boot) but this machine cannot open it; keel does not erase a volume on the word of its header. If this machine's first boot was interrupted, erase the header from a rescue system (wipefs -a $DEV) and boot again; otherwise the disk was tampered with"
    # Opened: mark PCR 11 before anything reads the volume's content (blkid below).
    measure keel-root-opened
    opened_measured=1
    if [ -n "$(blkid -p -o value -s TYPE /dev/mapper/root || true)" ]; then
        say "this machine opens it and it holds a file system: finishing it (nothing is erased)"
        cryptsetup config --label keel-root "$DEV"
        exit 0
    fi
    say "this machine opens it and it holds no file system yet: creating it again (this boot is reported untrusted; the next one is not)"
    cryptsetup close root
else
    DEV=$(readlink -f /dev/gpt-auto-root)
    fstype=$(blkid -p -o value -s TYPE "$DEV" || true)
    [ -z "$fstype" ] || fail "root partition $DEV holds a $fstype file system, not a LUKS2 volume; this image keeps /etc and /var only in a TPM-sealed volume (wipe the partition to start over: its data cannot be used)"
fi

umask 077
# /run/cryptsetup is libcryptsetup's lock directory: below, the header is changed (TPM
# enrolment, recovery key) while the volume is opened from it, and the locks keep each of them
# to a consistent copy.
KEY=/run/keel/root-init.key
enrol=""
finished=0
cleanup() {
    [ -z "$enrol" ] || { kill "$enrol" 2>/dev/null || true; wait "$enrol" 2>/dev/null || true; }
    rm -f "$KEY" /run/keel/recovery-key /run/keel/recovery-key.line
    umount /run/keel/newroot 2>/dev/null || true
    [ "$finished" = 1 ] || cryptsetup close root 2>/dev/null || true
}
trap cleanup EXIT
if [ "$TPM" = 1 ]; then
    head -c 64 /dev/urandom > "$KEY"
else
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
    # PCR 12 and 13 must be empty when the key is released: systemd-stub measures a command
    # line from outside the UKI (accepted when Secure Boot is off), credentials and addons into
    # 12, system extensions into 13. With Secure Boot on now, PCR 7 (Secure Boot state and keys)
    # must also read as now: switching it off or enrolling other keys locks the root.
    PCRS="12:sha256=$ZERO+13:sha256=$ZERO"
    sb=$(od -An -tu1 -j4 -N1 /sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c 2>/dev/null | tr -d ' ' || true)
    if [ "$sb" = 1 ]; then
        PCRS="7+$PCRS"
        say "sealing the volume key to the TPM: the operator's signed PCR 11 policy, PCR 12 and 13 empty, PCR 7 as now (Secure Boot on)"
    else
        say "sealing the volume key to the TPM: the operator's signed PCR 11 policy, PCR 12 and 13 empty (Secure Boot is off: PCR 7 not bound)"
    fi
    # The enrolments run while the volume is opened and its file system made (two CPUs, and the
    # TPM works apart from both).
    (
        systemd-cryptenroll --unlock-key-file="$KEY" --tpm2-device=auto --tpm2-pcrs="$PCRS" \
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
    # The recovery key leaves the initrd only encrypted to the operator's recovery key (in the
    # verity-protected /usr); the operator decrypts it with `keel keys recover`.
    grep -v '^$' /run/keel/recovery-key | tail -n 1 > /run/keel/recovery-key.line
    # systemd's recovery keys: 8 groups of 8 modhex characters.
    grep -Eqx '[cbdefghijklnrtuv]{8}(-[cbdefghijklnrtuv]{8}){7}' /run/keel/recovery-key.line \
        || fail "systemd-cryptenroll printed no recovery key in the expected form; not escrowing it"
    /usr/lib/keel/escrow /sysusr/usr/lib/keel/trust/recovery.pub.pem < /run/keel/recovery-key.line \
            > /run/keel/newroot/var/lib/keel/recovery-key.escrow \
        || fail "escrowing the recovery key failed (is /usr/lib/keel/trust/recovery.pub.pem in the image?)"
    umount /run/keel/newroot
    # Batch mode needs no remaining passphrase; it still says "Nothing to read on input".
    cryptsetup luksKillSlot -q "$DEV" 0 < /dev/null 2> /run/keel/killslot.log \
        || { cat /run/keel/killslot.log >&2; fail "removing the one-time key slot failed"; }
fi
cryptsetup config --label keel-root "$DEV"
finished=1
[ "$opened_measured" = 1 ] || measure keel-root-opened
if [ "$TPM" = 1 ]; then
    say "root volume sealed to this TPM and opened; recovery key escrowed to the operator's recovery key in /var/lib/keel/recovery-key.escrow (decrypt with keel keys recover)"
else
    say "root volume created unprotected and opened"
fi
