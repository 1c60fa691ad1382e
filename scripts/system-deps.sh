#!/usr/bin/env bash
# Debian packages that Qt (xcb), vispy (OpenGL) and Xvfb need on a bare machine.
# Installs only what is missing; does nothing on a machine that has them all.
set -euo pipefail

packages=(
  xvfb xauth libgl1 libegl1 libglx-mesa0 libgl1-mesa-dri libglib2.0-0
  libfontconfig1 libdbus-1-3 libxkbcommon0 libxkbcommon-x11-0 libx11-xcb1
  libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0
  libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libxcb-xinerama0 libxcb-xkb1
  libxcb-glx0 libxcb-sync1 libxcb-shm0
)

command -v dpkg-query >/dev/null || { echo "system-deps: not a Debian system, skipping"; exit 0; }

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "system-deps: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
