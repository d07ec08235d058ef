"""Media I/O with PyAV: probe, decode, encode, mux, images and atomic output.

Modules: probe.py (what a file holds), decode.py and transcode.py (decode -> process ->
encode/mux), frames.py (frames as RGB, painting rectangles back), encoders.py (encoder and
container decisions), images.py (stills, atomic output), pipes.py (stdin/stdout streams).

Everything that touches a media file lives here; the rest of the pipeline only sees
``VideoFrame.image`` arrays and hands back processed arrays plus dirty rectangles.

Array contract at this boundary: images are ``(H, W, 3)`` ``uint8`` RGB, C-contiguous,
*upright* (the container's display rotation / EXIF orientation already applied).
Rectangles are ``(x0, y0, x1, y1)`` in upright pixel coordinates, ``x1``/``y1`` exclusive.

Policies (see the README for the user-facing wording):

* Timing: every output frame keeps its input frame's pts in the input's time base
  (variable frame rate is preserved, nothing is resampled to a fixed rate).
* Pixels: outside the dirty rectangles the decoded planes go to the encoder untouched;
  only the rectangles are converted RGB->YUV, with the frame's own matrix and range.
  The output keeps the input's pixel format (10-bit stays 10-bit when the encoder can
  do it, otherwise an :class:`InputError`) and its colour tags.
* Rotation: frames are rotated upright for processing, rotated back to the stored
  orientation before encoding, and the input's display matrix is written unchanged.
* Audio: ``copy`` (packets byte for byte), ``aac`` (re-encode), ``none`` (drop).
  A container that cannot hold the copied audio raises :class:`OutputError` before any
  frame is written.
* Subtitles: copied packet for packet when the output container can hold them (text
  subtitles in .mkv, mov_text in .mp4), otherwise dropped with a warning.
* Metadata: container and stream tags (GPS location, creation time, title, device, the
  source's encoder and handler names ...) and chapters are dropped unless ``keep_metadata``;
  only the streams' ``language`` tag is kept. Data streams (telemetry, GPS tracks) are never
  copied, nor are pictures (cover art, image attachments: deid does not anonymize them);
  ``keep_metadata`` keeps tags, chapters and font attachments where the container allows.
* Damage: a video packet the decoder rejects is skipped, a frame it conceals is kept; the
  errors, the frames lost and the times of the affected frames are reported
  (``decode_errors``, ``frames_lost``, ``decode_error_times``) and logged as a warning.
* Odd sizes: an encoder that cannot store the size in the pixel format (H.264/HEVC 4:2:0 at
  641x361) gets the last column/row cropped, with a warning.
"""
