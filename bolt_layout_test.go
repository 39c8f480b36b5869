package storage_test

// A damaged bbolt layout is reported, never mistaken for an empty store:
// TestBoltDamagedLayoutIsDataLoss puts a plain key where the layout has a
// bucket and runs every operation.

import (
	"context"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"

	"github.com/snapmeta/storage"
)

// className names the errdefs class of err ("ok" for nil, "NO CLASS" for an
// error without one).
func className(err error) string {
	if err == nil {
		return "ok"
	}
	for _, c := range []struct {
		name string
		is   func(error) bool
	}{
		{"NotFound", errdefs.IsNotFound},
		{"AlreadyExists", errdefs.IsAlreadyExists},
		{"InvalidArgument", errdefs.IsInvalidArgument},
		{"FailedPrecondition", errdefs.IsFailedPrecondition},
		{"DataLoss", errdefs.IsDataLoss},
		{"ResourceExhausted", errdefs.IsResourceExhausted},
		{"Unavailable", errdefs.IsUnavailable},
		{"Internal", errdefs.IsInternal},
	} {
		if c.is(err) {
			return c.name
		}
	}
	return "NO CLASS"
}

// TestBoltDamagedLayoutIsDataLoss runs every operation on a file where a
// plain key stands where the layout has a bucket: each operation that needs
// that bucket fails with class DataLoss (ErrCorrupt), the others work.
func TestBoltDamagedLayoutIsDataLoss(t *testing.T) {
	// The operations, each in its own transaction on the store of
	// chkBuildChain. lone-a is the damaged snapshot where one is.
	ops := []struct {
		name     string
		writable bool
		do       func(ctx context.Context) error
	}{
		{"GetInfo", false, func(ctx context.Context) error { _, _, _, err := storage.GetInfo(ctx, "lone-a"); return err }},
		{"GetSnapshot", false, func(ctx context.Context) error { _, err := storage.GetSnapshot(ctx, "work"); return err }},
		{"WalkInfo", false, func(ctx context.Context) error {
			return storage.WalkInfo(ctx, func(context.Context, snapshots.Info) error { return nil })
		}},
		{"IDMap", false, func(ctx context.Context) error { _, err := storage.IDMap(ctx); return err }},
		{"UpdateInfo", true, func(ctx context.Context) error {
			_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: "lone-a", Labels: map[string]string{"a": "b"}})
			return err
		}},
		{"CreateSnapshot", true, func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "new", "base")
			return err
		}},
		{"CreateSnapshot of the damaged name", true, func(ctx context.Context) error {
			_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, "lone-a", "")
			return err
		}},
		{"CommitActive", true, func(ctx context.Context) error {
			_, err := storage.CommitActive(ctx, "work", "work-c", snapshots.Usage{})
			return err
		}},
		{"CommitActive to the damaged name", true, func(ctx context.Context) error {
			_, err := storage.CommitActive(ctx, "work", "lone-a", snapshots.Usage{})
			return err
		}},
		{"Remove", true, func(ctx context.Context) error { _, _, err := storage.Remove(ctx, "lone-a"); return err }},
	}
	for _, c := range []struct {
		name   string
		damage func(t *testing.T, tx *bolt.Tx)
		// ok are the operations that work; the others are DataLoss, but
		// for those named in other.
		ok    []string
		other map[string]string
	}{
		{
			name: "snapshots bucket is a plain key",
			damage: func(t *testing.T, tx *bolt.Tx) {
				chkReplaceBucketByKey(t, tx.Bucket([]byte(storage.KeyVersion)), storage.KeySnapshots)
			},
		},
		{
			name: "parents bucket is a plain key",
			damage: func(t *testing.T, tx *bolt.Tx) {
				chkReplaceBucketByKey(t, tx.Bucket([]byte(storage.KeyVersion)), storage.KeyParents)
			},
			ok:    []string{"GetInfo", "GetSnapshot", "WalkInfo", "IDMap"},
			other: map[string]string{"CreateSnapshot of the damaged name": "AlreadyExists", "CommitActive to the damaged name": "AlreadyExists"},
		},
		{
			name: "a snapshot's bucket is a plain key",
			damage: func(t *testing.T, tx *bolt.Tx) {
				chkReplaceBucketByKey(t, tx.Bucket([]byte(storage.KeyVersion)).Bucket([]byte(storage.KeySnapshots)), "lone-a")
			},
			ok: []string{"GetSnapshot", "CreateSnapshot", "CommitActive"},
		},
		{
			name: "a snapshot's labels bucket is a plain key",
			damage: func(t *testing.T, tx *bolt.Tx) {
				snaps := tx.Bucket([]byte(storage.KeyVersion)).Bucket([]byte(storage.KeySnapshots))
				require.NoError(t, snaps.Bucket([]byte("lone-a")).Put([]byte(storage.KeyLabels), []byte("not a bucket")))
			},
			// Remove reads only the identity, which is sound, and takes
			// the damaged labels with the record.
			ok: []string{"GetSnapshot", "CreateSnapshot", "CommitActive", "Remove"},
			// Only the identity of the name is read, which is sound.
			other: map[string]string{"CreateSnapshot of the damaged name": "AlreadyExists", "CommitActive to the damaged name": "AlreadyExists"},
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := chkFreshBolt(t)
			chkBuildChain(t, s.ms)
			s.raw(t, func(r chkRaw) { c.damage(t, r.(*chkBoltRaw).tx) })
			for _, op := range ops {
				want := "DataLoss"
				if w, ok := c.other[op.name]; ok {
					want = w
				}
				for _, name := range c.ok {
					if name == op.name {
						want = "ok"
					}
				}
				err := s.ms.WithTransaction(context.Background(), op.writable, op.do)
				assert.Equal(t, want, className(err), "%s: got %v", op.name, err)
				if want == "DataLoss" {
					assert.ErrorIs(t, err, storage.ErrCorrupt, "%s", op.name)
				}
			}
		})
	}
}
