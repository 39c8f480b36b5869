package main

import (
	"context"
	binenc "encoding/binary"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/snapmeta/storage"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"
)

// salvageBase builds a store of 3000 snapshots, big enough to have branch
// pages, in one transaction, and returns its bytes, page size, the
// snapshots bucket's root (a branch page), the fullest leaf page of actives
// under it (actives have no children, so only the page's own records can
// be lost) and the export of every record. 300 committed layers ("l-…",
// in chains of 10, so every record fits inline in its page) sort before
// the 2700 actives ("s-…"); one active in nine has a parent (the parents
// index, which names lost children, stays small: bbolt writes the
// buckets in random order, and the truncated file must hold snapshot
// pages whichever comes first). With labels, every snapshot bucket has a
// page of its own (bbolt never inlines a bucket holding a bucket), written
// before the pages naming them; without, every record is inline in the
// leaf pages of the snapshots bucket.
func salvageBase(t *testing.T, labels bool) (data []byte, ps int, branch, leaf uint64, want map[string]string) {
	path := filepath.Join(t.TempDir(), "base.db")
	ms, err := storage.NewBoltMetaStore(path, func(o *bolt.Options) error { o.NoSync = true; return nil })
	require.NoError(t, err)
	err = ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
		layer := ""
		for i := 0; i < 3000; i++ {
			name := fmt.Sprintf("s-%05d", i)
			if i%100 == 0 {
				layer = ""
			}
			parent := ""
			if i%5 == 0 {
				parent = layer
			}
			var opts []snapshots.Opt
			if labels {
				opts = append(opts, snapshots.WithLabels(map[string]string{"n": name}))
			}
			if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name, parent, opts...); err != nil {
				return err
			}
			if i%10 == 0 {
				layer = fmt.Sprintf("l-%05d", i)
				if _, err := storage.CommitActive(ctx, name, layer, snapshots.Usage{Size: int64(i), Inodes: 1}); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if cerr := ms.Close(); err == nil {
		err = cerr
	}
	require.NoError(t, err)
	data, err = os.ReadFile(path)
	require.NoError(t, err)
	want = exportLines(t, path)
	require.Len(t, want, 3000)
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	require.NoError(t, err)
	defer db.Close()
	require.NoError(t, db.View(func(tx *bolt.Tx) error {
		ps = tx.DB().Info().PageSize
		branch = uint64(tx.Bucket([]byte(storage.KeyVersion)).Bucket([]byte(storage.KeySnapshots)).Root())
		return nil
	}))
	// The fullest leaf of actives among the branch's children (a branch
	// element is 16 bytes: pos, ksize, then the pgid).
	p := data[int(branch)*ps:]
	require.Equal(t, uint16(0x01), binenc.LittleEndian.Uint16(p[8:]), "the root of snapshots is a branch page")
	most := 0
	for i := 0; i < int(binenc.LittleEndian.Uint16(p[10:])); i++ {
		id := binenc.LittleEndian.Uint64(p[16+16*i+8:])
		if binenc.LittleEndian.Uint16(data[int(id)*ps+8:]) != 0x02 {
			continue
		}
		names := leafNames(t, data, ps, id)
		if len(names) > most && strings.HasPrefix(names[0], "s-") {
			leaf, most = id, len(names)
		}
	}
	return data, ps, branch, leaf, want
}

// snapshotPages returns the page holding each snapshot's bucket: its own
// page, or the leaf page holding it inline.
func snapshotPages(t *testing.T, data []byte) map[string]uint64 {
	path := filepath.Join(t.TempDir(), "copy.db")
	require.NoError(t, os.WriteFile(path, data, 0o600))
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	require.NoError(t, err)
	defer db.Close()
	pages := map[string]uint64{}
	require.NoError(t, db.View(func(tx *bolt.Tx) error {
		snaps := tx.Bucket([]byte(storage.KeyVersion)).Bucket([]byte(storage.KeySnapshots))
		return snaps.ForEachBucket(func(k []byte) error {
			if root := snaps.Bucket(k).Root(); root != 0 {
				pages[string(k)] = uint64(root)
			}
			return nil
		})
	}))
	return pages
}

// exportLines exports the store at path: name -> JSON line.
func exportLines(t *testing.T, path string) map[string]string {
	t.Helper()
	lines := map[string]string{}
	for _, line := range strings.Split(strings.TrimSuffix(ok(t, "export", "--store", path), "\n"), "\n") {
		if line == "" {
			continue
		}
		var r struct{ Name string }
		require.NoError(t, json.Unmarshal([]byte(line), &r))
		lines[r.Name] = line
	}
	return lines
}

// leafNames returns the names in the snapshots bucket's leaf page pg of
// the intact file.
func leafNames(t *testing.T, data []byte, ps int, pg uint64) []string {
	t.Helper()
	p := data[int(pg)*ps:]
	require.Equal(t, uint16(0x02), binenc.LittleEndian.Uint16(p[8:]), "page %d is a leaf", pg)
	var names []string
	for i := 0; i < int(binenc.LittleEndian.Uint16(p[10:])); i++ {
		e := p[16+16*i:]
		pos, ksize := binenc.LittleEndian.Uint32(e[4:]), binenc.LittleEndian.Uint32(e[8:])
		names = append(names, string(e[16*0+pos:][:ksize]))
	}
	return names
}

func TestSalvageDamagedFiles(t *testing.T) {
	base, ps, branch, leaf, want := salvageBase(t, true)
	pages := snapshotPages(t, base)
	inline, _, _, _, wantInline := salvageBase(t, false)
	random := func(page uint64, at int) []byte {
		d := append([]byte(nil), base...)
		for i := 0; i < 200; i++ {
			d[int(page)*ps+at+i] = byte(i*131 + 7)
		}
		return d
	}
	zero := func(page int) []byte {
		d := append([]byte(nil), base...)
		clear(d[page*ps : (page+1)*ps])
		return d
	}
	onLeaf := leafNames(t, base, ps, leaf)
	require.Greater(t, len(onLeaf), 20, "the damaged leaf page holds more than the 200 bytes reach")
	for _, tc := range []struct {
		name    string
		data    []byte
		nothing bool // nothing can be read: no file is created
		// At least min records are salvaged, at most maxLost lost; the
		// lost ones named are among mayLose (nil: any).
		min, maxLost int
		mayLose      []string
		cut          int  // truncated here: every record before it is accounted for
		inline       bool // of the store without labels
	}{
		{name: "truncated to 8 KiB", data: base[:8<<10], nothing: true},
		// The records in the first 24 pages are salvaged or reported
		// lost (see below): with labels, they are pages of their own,
		// whose names are in pages past the cut, so they are lost by ID
		// (unless the parents index, before the cut half the time, names
		// them).
		{name: "truncated to 100000 bytes", data: base[:100000], maxLost: 3000, cut: 100000},
		// Without labels, the records are inline in the leaf pages: those
		// before the cut are salvaged (the parents index, of a few pages,
		// may come first); those whose parent is past it are lost.
		{name: "truncated to 100000 bytes, records inline", data: inline[:100000], min: 60, maxLost: 3000, inline: true},
		// 200 bytes cover 13 element headers of the leaf page; their
		// keys and values, written after the headers, are read again.
		{name: "random bytes in a leaf page's headers", data: random(leaf, 16), min: 3000},
		// 200 bytes in the keys and values of a leaf page: the records
		// they reach are lost, named if their key still reads or the
		// parents index names them, counted otherwise. A record with
		// labels has a page of its own: it is lost by ID.
		{name: "random bytes in a leaf page's records", data: random(leaf, ps/2), min: 3000 - 12, maxLost: 12, mayLose: onLeaf},
		// A branch page holds no record: every leaf is read directly.
		{name: "random bytes in a branch page", data: random(branch, 16), min: 3000},
		// The valid meta page is the empty store's: every record is in
		// pages it does not name.
		{name: "meta page 0 zeroed", data: zero(0), min: 3000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			from, to := filepath.Join(dir, "damaged.db"), filepath.Join(dir, "new.db")
			require.NoError(t, os.WriteFile(from, tc.data, 0o600))
			// Every reading command says the file is damaged, without a
			// stack trace.
			for _, cmd := range []string{"ls", "tree", "export", "check"} {
				r := exe(t, cmd, "--store", from)
				assert.NotContains(t, r.stderr, "goroutine ", cmd)
				assert.NotContains(t, r.stderr, "panic:", cmd)
			}
			r := exe(t, "salvage", "--from", from, "--to", to)
			require.NotContains(t, r.stderr, "goroutine ")
			after, err := os.ReadFile(from)
			require.NoError(t, err)
			assert.True(t, string(after) == string(tc.data), "salvage changed the damaged file")
			if tc.nothing {
				wantFail(t, r, 1, "nothing could be read")
				assert.NoFileExists(t, to, "salvage created a file from nothing")
				return
			}
			require.Contains(t, []int{0, 1}, r.code, "%s%s", r.stdout, r.stderr)
			t.Logf("%s", r.stdout[max(0, len(r.stdout)-400):])
			var salvaged, lost int
			require.Contains(t, r.stdout, "salvaged ", r.stderr)
			_, err = fmt.Sscanf(r.stdout[strings.LastIndex(r.stdout, "salvaged "):], "salvaged %d snapshot(s) to "+to+", %d lost", &salvaged, &lost)
			require.NoError(t, err, r.stdout)
			assert.GreaterOrEqual(t, salvaged, tc.min)
			assert.LessOrEqual(t, lost, tc.maxLost)
			assert.Equal(t, lost == 0, r.code == 0, "exit code %d with %d lost", r.code, lost)
			if tc.mayLose != nil {
				for _, line := range strings.Split(r.stdout, "\n") {
					var name string
					if _, err := fmt.Sscanf(line, "lost: %q", &name); err == nil {
						assert.Contains(t, tc.mayLose, name, "lost a record of another page")
					}
				}
			}
			got := exe(t, "check", "--store", to)
			assert.Equal(t, 0, got.code, "check of the salvaged file:\n%s%s", got.stdout, got.stderr)
			// Every salvaged record is the original, byte for byte.
			out := exportLines(t, to)
			assert.Equal(t, salvaged, len(out))
			orig := want
			if tc.inline {
				orig = wantInline
			}
			for name, line := range out {
				assert.Equal(t, orig[name], line, name)
			}
			for name, page := range pages {
				if tc.cut > 0 && (int(page)+1)*ps <= tc.cut {
					var rec struct{ ID string }
					require.NoError(t, json.Unmarshal([]byte(want[name]), &rec))
					_, saved := out[name]
					assert.True(t, saved || strings.Contains(r.stdout, "(ID "+rec.ID+")") || strings.Contains(r.stdout, fmt.Sprintf("%q", name)),
						"%s (ID %s) in page %d is neither salvaged nor reported", name, rec.ID, page)
				}
			}
			// A second salvage refuses the existing target.
			wantFail(t, exe(t, "salvage", "--from", from, "--to", to), 1, "exists")
		})
	}
}

// scanSeed is a small store: 40 snapshots, half with labels (a page of
// their own), half inline.
func scanSeed(t testing.TB) []byte {
	path := filepath.Join(t.TempDir(), "seed.db")
	ms, err := storage.NewBoltMetaStore(path)
	require.NoError(t, err)
	require.NoError(t, ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
		for i := 0; i < 40; i++ {
			var opts []snapshots.Opt
			if i%2 == 0 {
				opts = append(opts, snapshots.WithLabels(map[string]string{"k": "v"}))
			}
			if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, fmt.Sprintf("s-%d", i), "", opts...); err != nil {
				return err
			}
		}
		return nil
	}))
	require.NoError(t, ms.Close())
	seed, err := os.ReadFile(path)
	require.NoError(t, err)
	return seed
}

// checkScan scans data and checks what it found is consistent.
func checkScan(t *testing.T, data []byte) *pageScan {
	s := scanPages(data)
	for name, cs := range s.copies {
		for _, c := range cs {
			if c.err == nil {
				assert.Equal(t, name, c.rec.Name)
			}
		}
	}
	return s
}

// TestScanPagesDamage: the page scan never panics and stays fast, whatever
// the bytes: 3000 seeded mutations of a small store (random bytes anywhere,
// runs of one byte, cuts).
func TestScanPagesDamage(t *testing.T) {
	seed := scanSeed(t)
	require.Len(t, checkScan(t, seed).copies, 40)
	rng := rand.New(rand.NewPCG(1, 2))
	start := time.Now()
	for i := 0; i < 3000; i++ {
		d := append([]byte(nil), seed...)
		switch i % 3 {
		case 0:
			for j := 0; j < 1+rng.IntN(64); j++ {
				d[rng.IntN(len(d))] = byte(rng.IntN(256))
			}
		case 1:
			at, n, b := rng.IntN(len(d)), rng.IntN(512), byte(rng.IntN(256))
			for j := at; j < min(len(d), at+n); j++ {
				d[j] = b
			}
		case 2:
			d = d[:rng.IntN(len(d))]
		}
		checkScan(t, d)
	}
	t.Logf("3000 scans in %v", time.Since(start))
}

// FuzzScanPages: the page scan never panics, whatever the bytes.
func FuzzScanPages(f *testing.F) {
	seed := scanSeed(f)
	f.Add(seed)
	f.Add(seed[:len(seed)/2])
	f.Fuzz(func(t *testing.T, data []byte) { checkScan(t, data) })
}
