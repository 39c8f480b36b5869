package main

import (
	"context"
	binenc "encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/snapmeta/storage"
	bolt "go.etcd.io/bbolt"
)

// salvageBase builds a store big enough to have branch pages and returns
// its bytes, page size, the snapshots bucket's root (a branch page) and
// a leaf page under it.
func salvageBase(t *testing.T) (data []byte, ps int, branch, leaf uint64) {
	path := filepath.Join(t.TempDir(), "base.db")
	ms, err := storage.NewBoltMetaStore(path, func(o *bolt.Options) error { o.NoSync = true; return nil })
	if err != nil {
		t.Fatal(err)
	}
	err = ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
		parent := ""
		for i := 0; i < 3000; i++ {
			name := fmt.Sprintf("a-%05d", i)
			if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, name, parent); err != nil {
				return err
			}
			if i%10 == 0 {
				layer := fmt.Sprintf("l-%05d", i)
				if _, err := storage.CommitActive(ctx, name, layer, snapshots.Usage{}); err != nil {
					return err
				}
				parent = layer
			}
		}
		return nil
	})
	if cerr := ms.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	if data, err = os.ReadFile(path); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, PreLoadFreelist: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	_ = db.View(func(tx *bolt.Tx) error {
		ps = tx.DB().Info().PageSize
		branch = uint64(tx.Bucket([]byte(storage.KeyVersion)).Bucket([]byte(storage.KeySnapshots)).Root())
		id := branch
		for {
			id = binenc.LittleEndian.Uint64(data[int(id)*ps+16+8:])
			if info, err := tx.Page(int(id)); err != nil || info.Type != "branch" {
				leaf = id
				return nil
			}
		}
	})
	return data, ps, branch, leaf
}

func TestSalvageDamagedFiles(t *testing.T) {
	base, ps, branch, leaf := salvageBase(t)
	random := func(page uint64) []byte {
		d := append([]byte(nil), base...)
		for i := 0; i < 200; i++ {
			d[int(page)*ps+16+i] = byte(i*131 + 7)
		}
		return d
	}
	zero := func(page int) []byte {
		d := append([]byte(nil), base...)
		clear(d[page*ps : (page+1)*ps])
		return d
	}
	for _, tc := range []struct {
		name    string
		data    []byte
		nothing bool // nothing can be read: no file is created
	}{
		{"truncated to 8 KiB", base[:8<<10], true},
		{"truncated to 100000 bytes", base[:100000], true},
		{"random bytes in a leaf page", random(leaf), false},
		{"random bytes in a branch page", random(branch), false},
		{"meta page 0 zeroed", zero(0), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			from, to := filepath.Join(dir, "damaged.db"), filepath.Join(dir, "new.db")
			if err := os.WriteFile(from, tc.data, 0o600); err != nil {
				t.Fatal(err)
			}
			// Every reading command says the file is damaged, without a
			// stack trace.
			for _, cmd := range []string{"ls", "tree", "export", "check"} {
				r := exe(t, cmd, "--store", from)
				if strings.Contains(r.stderr, "goroutine ") || strings.Contains(r.stderr, "panic:") {
					t.Errorf("%s crashed:\n%s", cmd, r.stderr)
				}
			}
			r := exe(t, "salvage", "--from", from, "--to", to)
			if strings.Contains(r.stderr, "goroutine ") {
				t.Fatalf("salvage crashed:\n%s", r.stderr)
			}
			after, err := os.ReadFile(from)
			if err != nil || string(after) != string(tc.data) {
				t.Error("salvage changed the damaged file")
			}
			if tc.nothing {
				wantFail(t, r, 1, "nothing could be read")
				if _, err := os.Stat(to); err == nil {
					t.Error("salvage created a file from nothing")
				}
				return
			}
			if r.code != 0 && r.code != 1 {
				t.Fatalf("salvage: exit %d\n%s%s", r.code, r.stdout, r.stderr)
			}
			if !strings.Contains(r.stdout, "salvaged ") {
				t.Errorf("salvage did not report:\n%s", r.stdout)
			}
			t.Logf("%s", r.stdout[max(0, len(r.stdout)-300):])
			if got := exe(t, "check", "--store", to); got.code != 0 {
				t.Errorf("check of the salvaged file: exit %d\n%s%s", got.code, got.stdout, got.stderr)
			}
			// A second salvage refuses the existing target.
			wantFail(t, exe(t, "salvage", "--from", from, "--to", to), 1, "exists")
		})
	}
}
