#!/bin/sh
# Regenerates sample_media/480P.mp4: 10 s of 854x480 H.264 (yuv420p, 30 fps, a keyframe
# every 2 s) with 48 kHz stereo AAC, made from ffmpeg's built-in test sources (lavfi), so
# no third-party media is shipped. Bit-exact flags keep the output reproducible.
set -eu
cd "$(dirname "$0")"
ffmpeg -nostdin -hide_banner -loglevel error -y \
  -f lavfi -i "testsrc2=size=854x480:rate=30:duration=10" \
  -f lavfi -i "sine=frequency=440:beep_factor=4:sample_rate=48000:duration=10" \
  -map 0:v -map 1:a \
  -c:v libx264 -preset medium -crf 26 -pix_fmt yuv420p -g 60 -threads 1 \
  -c:a aac -b:a 96k -ac 2 \
  -map_metadata -1 -fflags +bitexact -flags:v +bitexact -flags:a +bitexact \
  -movflags +faststart \
  480P.mp4
ls -l 480P.mp4
