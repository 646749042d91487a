"""OpenPose body: from the network's heatmaps and part-affinity fields to a drawn skeleton, the
way the reference (ControlNet's OpenPose annotator, after CMU's and pytorch-openpose) does it:
one scale (0.5 x 368 / height), peaks of the Gaussian-smoothed heatmaps, limbs scored along the
affinity fields, people assembled greedily, 17 limbs and 18 joints drawn in the COCO colours.
"""

from __future__ import annotations

import math

import numpy as np

from engine.annotators.post import cv2

BOX, STRIDE, PAD_VALUE = 368, 8, 128
PEAK_THRESHOLD, PAF_THRESHOLD, SAMPLES = 0.1, 0.05, 10

# Joints (1-based, COCO-18 order: nose, neck, r-shoulder, r-elbow, r-wrist, l-shoulder, ...) joined
# by each limb, and the two affinity-field channels (of 38) that score it.
LIMBS = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
         (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (3, 17), (6, 18)]
PAF_CHANNELS = [(12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7),
                (8, 9), (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27)]
COLOURS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
           (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
           (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]


def _resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area averaging when shrinking, Lanczos when growing (judged on width + height)."""
    grow = (width + height) / (array.shape[1] + array.shape[0]) >= 1
    return cv2().resize(array, (width, height), interpolation=cv2().INTER_LANCZOS4 if grow else cv2().INTER_AREA)


def network_input(rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """The image as the body network takes it: BGR, scaled so the height is half of 368, padded
    right and down to a multiple of 8 with grey, in -0.5..0.5, (3, h, w). Also the scaled size."""
    h, w = rgb.shape[:2]
    scale = 0.5 * BOX / h
    scaled = _resize(np.ascontiguousarray(rgb[..., ::-1]), int(w * scale), int(h * scale))
    sh, sw = scaled.shape[:2]
    padded = np.full((sh + (-sh) % STRIDE, sw + (-sw) % STRIDE, 3), PAD_VALUE, dtype=np.uint8)
    padded[:sh, :sw] = scaled
    return np.transpose(padded.astype(np.float32), (2, 0, 1)) / 256 - 0.5, (sh, sw)


def output_maps(raw: np.ndarray, scaled: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """A (C, h/8, w/8) network output -> (H, W, C) over the original image: grown 8x, padding cut."""
    maps = np.ascontiguousarray(np.transpose(raw, (1, 2, 0)).astype(np.float32))
    maps = _channels(maps, lambda m: _resize(m, m.shape[1] * STRIDE, m.shape[0] * STRIDE))
    maps = maps[:scaled[0], :scaled[1]]
    return _channels(np.ascontiguousarray(maps), lambda m: _resize(m, size[1], size[0]))


def _channels(maps: np.ndarray, fn) -> np.ndarray:
    return np.stack([fn(np.ascontiguousarray(maps[..., c])) for c in range(maps.shape[2])], axis=2)


def find_peaks(heatmaps: np.ndarray) -> list[list[tuple]]:
    """Per joint (18), its peaks ``(x, y, score, id)``: local maxima (>= the 4 neighbours) of the
    heatmap smoothed with a Gaussian of sigma 3, above 0.1; ids count across joints."""
    from scipy.ndimage import gaussian_filter

    peaks, counter = [], 0
    for part in range(18):
        raw = heatmaps[:, :, part]
        smooth = gaussian_filter(raw, sigma=3)
        p = np.pad(smooth, 1)
        binary = ((smooth >= p[:-2, 1:-1]) & (smooth >= p[2:, 1:-1]) & (smooth >= p[1:-1, :-2])
                  & (smooth >= p[1:-1, 2:]) & (smooth > PEAK_THRESHOLD))
        ys, xs = np.nonzero(binary)
        found = [(int(x), int(y), float(raw[y, x]), counter + i) for i, (y, x) in enumerate(zip(ys, xs))]
        peaks.append(found)
        counter += len(found)
    return peaks


def connect(peaks: list[list[tuple]], pafs: np.ndarray, height: int) -> list[np.ndarray | None]:
    """Per limb, its connections ``[id_a, id_b, score, i, j]``: pairs whose affinity field, sampled
    at 10 points along the segment, points along it (80% of samples above 0.05, mean with a
    length penalty above 0), best first, each peak used once."""
    found = []
    for (a, b), (cx, cy) in zip(LIMBS, PAF_CHANNELS):
        cand_a, cand_b = peaks[a - 1], peaks[b - 1]
        if not cand_a or not cand_b:
            found.append(None)
            continue
        scored = []
        for i, pa in enumerate(cand_a):
            for j, pb in enumerate(cand_b):
                vec = np.subtract(pb[:2], pa[:2])
                norm = max(0.001, math.sqrt(vec[0] * vec[0] + vec[1] * vec[1]))
                vec = vec / norm
                xs = np.round(np.linspace(pa[0], pb[0], num=SAMPLES)).astype(int)
                ys = np.round(np.linspace(pa[1], pb[1], num=SAMPLES)).astype(int)
                along = pafs[ys, xs, cx] * vec[0] + pafs[ys, xs, cy] * vec[1]
                score = along.sum() / len(along) + min(0.5 * height / norm - 1, 0)
                if np.count_nonzero(along > PAF_THRESHOLD) > 0.8 * len(along) and score > 0:
                    scored.append((i, j, score))
        scored.sort(key=lambda item: item[2], reverse=True)
        rows, used_a, used_b = [], set(), set()
        for i, j, score in scored:
            if i not in used_a and j not in used_b:
                rows.append([cand_a[i][3], cand_b[j][3], score, i, j])
                used_a.add(i)
                used_b.add(j)
                if len(rows) >= min(len(cand_a), len(cand_b)):
                    break
        found.append(np.array(rows).reshape(-1, 5))
    return found


def assemble(peaks: list[list[tuple]], connections: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
    """People from limbs: ``(candidates [x, y, score, id], people)``, each person a row of 18 peak
    ids (-1: not seen), its total score and its joint count; people with under 4 joints or a mean
    score under 0.4 are dropped."""
    candidates = np.array([p for joint in peaks for p in joint], dtype=np.float64).reshape(-1, 4)
    people = -np.ones((0, 20))
    for k, rows in enumerate(connections):
        if rows is None:
            continue
        ia, ib = LIMBS[k][0] - 1, LIMBS[k][1] - 1
        for row in rows:
            part_a, part_b, score = row[0], row[1], row[2]
            hits = [n for n in range(len(people)) if people[n][ia] == part_a or people[n][ib] == part_b][:2]
            if len(hits) == 1 or (len(hits) == 2 and np.any((people[hits[0]][:-2] >= 0) & (people[hits[1]][:-2] >= 0))):
                n = hits[0]
                if people[n][ib] != part_b:
                    people[n][ib] = part_b
                    people[n][-1] += 1
                    people[n][-2] += candidates[int(part_b), 2] + score
            elif len(hits) == 2:  # two disjoint halves of one person: merge them
                n1, n2 = hits
                people[n1][:-2] += people[n2][:-2] + 1
                people[n1][-2:] += people[n2][-2:]
                people[n1][-2] += score
                people = np.delete(people, n2, 0)
            elif not hits and k < 17:
                person = -np.ones(20)
                person[ia], person[ib] = part_a, part_b
                person[-1] = 2
                person[-2] = candidates[[int(part_a), int(part_b)], 2].sum() + score
                people = np.vstack([people, person])
    keep = [n for n in range(len(people)) if people[n][-1] >= 4 and people[n][-2] / people[n][-1] >= 0.4]
    return candidates, people[keep]


def draw(candidates: np.ndarray, people: np.ndarray, height: int, width: int) -> np.ndarray:
    """The skeletons on black: 17 limbs as filled ellipses 4 px wide in the limb's colour, the
    canvas dimmed to 60%, then 18 joints as discs of radius 4."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for i in range(17):
        for person in people:
            index = person[np.array(LIMBS[i]) - 1]
            if -1 in index:
                continue
            xs, ys = candidates[index.astype(int), 0], candidates[index.astype(int), 1]
            length = math.hypot(xs[0] - xs[1], ys[0] - ys[1])
            angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
            polygon = cv2().ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), 4), int(angle), 0,
                                         360, 1)
            cv2().fillConvexPoly(canvas, polygon, COLOURS[i])
    canvas = (canvas * 0.6).astype(np.uint8)
    for i in range(18):
        for person in people:
            index = int(person[i])
            if index != -1:
                x, y = candidates[index][:2]
                cv2().circle(canvas, (int(x), int(y)), 4, COLOURS[i], thickness=-1)
    return canvas


def pose_image(pafs: np.ndarray, heatmaps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Full-size affinity fields (H, W, 38) and heatmaps (H, W, 19) -> the drawn pose."""
    peaks = find_peaks(heatmaps)
    candidates, people = assemble(peaks, connect(peaks, pafs, height))
    return draw(candidates, people, height, width)
