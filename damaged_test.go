package storage_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"

	"github.com/snapmeta/storage"
)

// dmgBase is a sound metadata.db, built once per size, and where its pages
// are: the page size, the snapshots bucket's root (a branch page once the
// store is big enough), a leaf page under it, and the page of a snapshot
// whose bucket has a page of its own (one with labels).
type dmgBase struct {
	data         []byte
	names        []string
	pageSize     int
	branch, leaf uint64 // 0: none
	record       uint64 // 0: none
	committed    string // a committed snapshot to create children of
}

var (
	dmgBasesMu sync.Mutex
	dmgBases   = map[int]*dmgBase{}
)

func dmgNoSync(o *bolt.Options) error { o.NoSync = true; return nil }

// dmgBuildBase builds (once per n) a store of n snapshots: a committed
// chain, actives and views on it, some with labels.
func dmgBuildBase(t testing.TB, n int) *dmgBase {
	dmgBasesMu.Lock()
	defer dmgBasesMu.Unlock()
	if b := dmgBases[n]; b != nil {
		return b
	}
	path := filepath.Join(t.TempDir(), "base.db")
	ms, err := storage.NewBoltMetaStore(path, dmgNoSync)
	require.NoError(t, err)
	b := &dmgBase{}
	ctx := context.Background()
	require.NoError(t, ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		parent := ""
		for i := 0; len(b.names) < n; i++ {
			var labels []snapshots.Opt
			if i%3 == 0 {
				labels = append(labels, snapshots.WithLabels(map[string]string{"containerd.io/gc.root": fmt.Sprint(i), "pad": "some label value to fill pages"}))
			}
			active := fmt.Sprintf("active-%05d", i)
			if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, active, parent, labels...); err != nil {
				return err
			}
			if i%4 == 0 && i < n/2 { // grow the chain
				layer := fmt.Sprintf("layer-%05d", i)
				if _, err := storage.CommitActive(ctx, active, layer, snapshots.Usage{Size: int64(i)}, labels...); err != nil {
					return err
				}
				b.names = append(b.names, layer)
				parent = layer
				continue
			}
			b.names = append(b.names, active)
			if i%5 == 1 && parent != "" {
				view := fmt.Sprintf("view-%05d", i)
				if _, err := storage.CreateSnapshot(ctx, snapshots.KindView, view, parent); err != nil {
					return err
				}
				b.names = append(b.names, view)
			}
		}
		b.committed = parent
		return nil
	}))
	// Two more commits, so that the older meta page also holds every
	// name: a file with one meta page lost opens at the other's state.
	for _, tail := range []string{"tail-1", "tail-2"} {
		require.NoError(t, ms.WithTransaction(ctx, true, func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, tail, "")
			return err
		}))
	}
	require.NoError(t, ms.Close())
	b.data, err = os.ReadFile(path)
	require.NoError(t, err)

	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, PreLoadFreelist: true})
	require.NoError(t, err)
	require.NoError(t, db.View(func(tx *bolt.Tx) error {
		b.pageSize = tx.DB().Info().PageSize
		snaps := tx.Bucket([]byte(storage.KeyVersion)).Bucket([]byte(storage.KeySnapshots))
		_ = snaps.ForEachBucket(func(k []byte) error {
			if r := snaps.Bucket(k).Root(); r != 0 && b.record == 0 {
				b.record = uint64(r)
			}
			return nil
		})
		root := snaps.Root()
		if info, err := tx.Page(int(root)); err == nil && info.Type == "branch" {
			b.branch = uint64(root)
			// Descend by the first element of each branch page
			// (header 16 bytes, then {pos, ksize uint32; pgid uint64}).
			id := b.branch
			for {
				p := b.data[int(id)*b.pageSize:]
				id = binary.LittleEndian.Uint64(p[16+8:])
				info, err := tx.Page(int(id))
				if err != nil || info.Type != "branch" {
					b.leaf = id
					break
				}
			}
		}
		return nil
	}))
	require.NoError(t, db.Close())
	dmgBases[n] = b
	return b
}

// dmgDamage is one way a file gets damaged: it returns the damaged bytes.
type dmgDamage struct {
	name string
	// met: the open meets the damage and refuses the file; else only
	// some operations meet it (the others may succeed), and none fails
	// without DataLoss.
	met   bool
	sound bool // bbolt works around it: every operation but Check succeeds
	// pages: a page of the snapshots bucket is damaged, which every
	// operation that reads every record meets.
	pages bool
	// readOnly: the open finds the tree damaged but contained (bbolt
	// stays within the file): it opens for reads only, every write is
	// refused, and Check reports the damage.
	readOnly bool
	apply    func(b *dmgBase) []byte
}

func dmgCopy(b *dmgBase) []byte { return append([]byte(nil), b.data...) }

func dmgRandomInto(b *dmgBase, page uint64, seed uint64) []byte {
	d := dmgCopy(b)
	off := int(page)*b.pageSize + 16 // past the header: the element table
	r := rand.New(rand.NewPCG(seed, seed))
	for i := 0; i < 200; i++ {
		d[off+i] = byte(r.Uint32())
	}
	return d
}

// dmgBranchElement writes v over the field at off (4: the key's length,
// 8: the child's page id) of the first element of the branch page.
func dmgBranchElement(b *dmgBase, off int, v uint64) []byte {
	d := dmgCopy(b)
	at := int(b.branch)*b.pageSize + 16 + off
	if off == 8 {
		binary.LittleEndian.PutUint64(d[at:], v)
	} else {
		binary.LittleEndian.PutUint32(d[at:], uint32(v))
	}
	return d
}

func dmgZeroPage(b *dmgBase, page int) []byte {
	d := dmgCopy(b)
	clear(d[page*b.pageSize : (page+1)*b.pageSize])
	return d
}

var dmgDamages = []dmgDamage{
	{name: "truncated to 8 KiB", met: true, apply: func(b *dmgBase) []byte { return dmgCopy(b)[:8<<10] }},
	{name: "truncated to 100000 bytes", met: true, apply: func(b *dmgBase) []byte { return dmgCopy(b)[:100000] }},
	{name: "random bytes in a leaf page", pages: true, apply: func(b *dmgBase) []byte { return dmgRandomInto(b, b.leaf, 1) }},
	{name: "random bytes in a branch page", pages: true, apply: func(b *dmgBase) []byte { return dmgRandomInto(b, b.branch, 2) }},
	{name: "a branch key's length reaching past the file", met: true, apply: func(b *dmgBase) []byte { return dmgBranchElement(b, 4, 0x00e1000c) }},
	{name: "a leaf key reaching into the next page", readOnly: true, apply: func(b *dmgBase) []byte {
		// Element 0 of a record's own page is a plain key (createdat).
		d := dmgCopy(b)
		at := int(b.record)*b.pageSize + 16 + 8
		binary.LittleEndian.PutUint32(d[at:], binary.LittleEndian.Uint32(d[at:])+uint32(b.pageSize))
		return d
	}},
	{name: "a leaf page naming itself another page", readOnly: true, apply: func(b *dmgBase) []byte {
		d := dmgCopy(b)
		binary.LittleEndian.PutUint64(d[int(b.leaf)*b.pageSize:], b.leaf+1)
		return d
	}},
	{name: "a branch page naming itself as its child", met: true, apply: func(b *dmgBase) []byte { return dmgBranchElement(b, 8, b.branch) }},
	{name: "both meta pages zeroed", met: true, apply: func(b *dmgBase) []byte { return dmgZeroPage(dmgBaseWith(b, dmgZeroPage(b, 0)), 1) }},
	{name: "meta page 0 zeroed", sound: true, apply: func(b *dmgBase) []byte { return dmgZeroPage(b, 0) }},
	{name: "meta page 1 zeroed", sound: true, apply: func(b *dmgBase) []byte { return dmgZeroPage(b, 1) }},
}

func dmgBaseWith(b *dmgBase, data []byte) *dmgBase {
	c := *b
	c.data = data
	return &c
}

// dmgOps are the operations a damaged file must survive. Each returns the
// error it met; a Check's page problems count as met damage.
var dmgOps = []struct {
	name string
	run  func(ctx context.Context, ms storage.MetaStore, b *dmgBase) error
}{
	{"GetInfo", func(ctx context.Context, ms storage.MetaStore, b *dmgBase) error {
		return ms.WithTransaction(ctx, false, func(ctx context.Context) error {
			for _, name := range b.names {
				if _, _, _, err := storage.GetInfo(ctx, name); err != nil {
					return err
				}
			}
			return nil
		})
	}},
	{"WalkInfo", func(ctx context.Context, ms storage.MetaStore, _ *dmgBase) error {
		return ms.WithTransaction(ctx, false, func(ctx context.Context) error {
			return storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil })
		})
	}},
	{"IDMap", func(ctx context.Context, ms storage.MetaStore, _ *dmgBase) error {
		return ms.WithTransaction(ctx, false, func(ctx context.Context) error {
			_, err := storage.IDMap(ctx)
			return err
		})
	}},
	{"Check", func(ctx context.Context, ms storage.MetaStore, _ *dmgBase) error {
		problems, err := storage.Check(ctx, ms)
		if err != nil {
			return err
		}
		var errs []error
		for _, p := range problems {
			errs = append(errs, fmt.Errorf("%s: %w", p, storage.ErrCorrupt))
		}
		return errors.Join(errs...)
	}},
	{"CreateSnapshot+Commit", func(ctx context.Context, ms storage.MetaStore, b *dmgBase) error {
		return ms.WithTransaction(ctx, true, func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "new-after-damage", b.committed)
			return err
		})
	}},
}

// dmgAssertDataLoss asserts err is DataLoss and, for damage below the
// records, says what to do.
func dmgAssertDataLoss(t *testing.T, err error) {
	t.Helper()
	assert.True(t, errdefs.IsDataLoss(err), "not DataLoss: %v", err)
	if errors.Is(err, storage.ErrDamaged) {
		assert.Contains(t, err.Error(), "snapmeta salvage --from")
	}
}

func TestDamagedFileNeverPanicsAndSaysSo(t *testing.T) {
	b := dmgBuildBase(t, 3000)
	require.NotZero(t, b.branch, "the store is too small to have branch pages")
	require.NotZero(t, b.record, "no record has a page of its own")
	ctx := context.Background()
	for _, dmg := range dmgDamages {
		for _, op := range dmgOps {
			t.Run(dmg.name+"/"+op.name, func(t *testing.T) {
				path := filepath.Join(t.TempDir(), "metadata.db")
				require.NoError(t, os.WriteFile(path, dmg.apply(b), 0o600))
				ms, err := storage.NewBoltMetaStore(path, dmgNoSync)
				if err != nil {
					assert.False(t, dmg.sound || dmg.readOnly, "refused at open: %v", err)
					dmgAssertDataLoss(t, err)
					assert.ErrorIs(t, err, storage.ErrDamaged)
					return
				}
				defer func() { assert.NoError(t, ms.Close()) }()
				assert.False(t, dmg.met, "a file damaged so was opened")
				err = op.run(ctx, ms, b)
				if dmg.sound && op.name != "Check" {
					assert.NoError(t, err)
					return
				}
				if dmg.sound {
					// Every operation works, and Check says a meta page
					// is lost (the next commits write it again).
					require.Error(t, err)
					assert.Contains(t, err.Error(), "page damage: ")
				}
				if dmg.readOnly && op.name == "Check" {
					require.Error(t, err, "Check did not find the damage")
				}
				if dmg.readOnly && op.name == "CreateSnapshot+Commit" {
					require.ErrorIs(t, err, storage.ErrDamaged)
					assert.Contains(t, err.Error(), "writes refused")
				}
				if dmg.pages && op.name != "CreateSnapshot+Commit" {
					require.Error(t, err, "the damage was not met")
				}
				if err != nil {
					dmgAssertDataLoss(t, err)
				}
			})
		}
	}
}

// A panic of bbolt in a writable transaction refuses every later write
// while reads go on. The file is damaged after the open read its tree (as
// a failing disk would): after a write met the damage, the next write
// fails at once with ErrDamaged.
func TestDamagedFileRefusesWritesAfterAWriteMetTheDamage(t *testing.T) {
	b := dmgBuildBase(t, 3000)
	path := filepath.Join(t.TempDir(), "metadata.db")
	require.NoError(t, os.WriteFile(path, b.data, 0o600))
	ms, err := storage.NewBoltMetaStore(path, dmgNoSync)
	require.NoError(t, err)
	defer func() { assert.NoError(t, ms.Close()) }()
	damaged := dmgRandomInto(b, b.branch, 2)
	page := damaged[int(b.branch)*b.pageSize : int(b.branch+1)*b.pageSize]
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.WriteAt(page, int64(b.branch)*int64(b.pageSize))
	require.NoError(t, err)
	require.NoError(t, f.Close())
	ctx := context.Background()
	walk := func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil })
	}
	err = ms.WithTransaction(ctx, true, walk)
	require.ErrorIs(t, err, storage.ErrDamaged)
	err = ms.WithTransaction(ctx, true, func(context.Context) error { return nil })
	require.ErrorIs(t, err, storage.ErrDamaged)
	assert.Contains(t, err.Error(), "writes refused")
	// Reads go on (and meet the damage again, without a panic).
	err = ms.WithTransaction(ctx, false, walk)
	assert.ErrorIs(t, err, storage.ErrDamaged)
}

// FuzzDamagedBoltFile damages a real metadata.db the fuzzer's way (op 0:
// truncate at off; 1: write data at off; 2: zero the page at off) and runs
// every operation on it: no panic escapes, and every error has an errdefs
// class (DataLoss when it is the damage's).
func FuzzDamagedBoltFile(f *testing.F) {
	b := dmgBuildBase(f, 48)
	ps := b.pageSize
	f.Add(uint8(0), uint32(8<<10), []byte(nil))
	f.Add(uint8(0), uint32(100000), []byte(nil))
	f.Add(uint8(1), uint32(int(b.leaf)*ps+16), bytes.Repeat([]byte{0xA5, 0x17, 0xFF, 0x03}, 50))
	f.Add(uint8(1), uint32(int(b.branch)*ps+16), bytes.Repeat([]byte{0x5A, 0xE1, 0x00, 0x7F}, 50))
	f.Add(uint8(1), uint32(16), bytes.Repeat([]byte{0x42}, 200))
	f.Add(uint8(1), uint32(ps+16), bytes.Repeat([]byte{0x42}, 200))
	f.Add(uint8(2), uint32(0), []byte(nil))
	f.Add(uint8(2), uint32(ps), []byte(nil))
	ctx := context.Background()
	f.Fuzz(func(t *testing.T, op uint8, off uint32, data []byte) {
		d := dmgCopy(b)
		o := int(off) % (len(d) + 1)
		switch op % 3 {
		case 0:
			d = d[:o]
		case 1:
			copy(d[o:], data)
		case 2:
			o -= o % ps
			clear(d[o:min(o+ps, len(d))])
		}
		path := filepath.Join(t.TempDir(), "metadata.db")
		require.NoError(t, os.WriteFile(path, d, 0o600))
		ms, err := storage.NewBoltMetaStore(path, dmgNoSync)
		if err != nil {
			require.NotEqual(t, errdefs.ErrUnknown, errdefs.Resolve(err), "no class: %v", err)
			return
		}
		defer func() { require.NoError(t, ms.Close()) }()
		for _, op := range dmgOps {
			if err := op.run(ctx, ms, b); err != nil {
				require.NotEqual(t, errdefs.ErrUnknown, errdefs.Resolve(err), "%s: no class: %v", op.name, err)
			}
		}
	})
}
