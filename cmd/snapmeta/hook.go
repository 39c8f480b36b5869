package main

import (
	"context"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/snapmeta/storage"
)

// importSnapshots creates snapshots exactly as recs describe them (name, ID,
// kind, parent, labels, created and updated times, usage), in order, in the
// writable transaction ctx carries, and raises the store's ID allocator
// above every imported ID. A parent comes before its children (or is in the
// store already). It refuses, changing nothing, a name that exists
// (errdefs AlreadyExists) and a missing or uncommitted parent (NotFound /
// InvalidArgument). A batch too large for the engine fails with
// storage.ErrTooLarge (ResourceExhausted); import and migrate then split it.
// It is storage.Import: CreateSnapshot allocates IDs, and a driver's
// directories are named by ID, so a copy must keep them.
func importSnapshots(ctx context.Context, recs []Record) error {
	out := make([]storage.Record, len(recs))
	for i, r := range recs {
		out[i] = storage.Record{
			Name:    r.Name,
			ID:      r.ID,
			Kind:    snapshots.Kind(r.Kind),
			Parent:  r.Parent,
			Labels:  r.Labels,
			Created: r.Created,
			Updated: r.Updated,
			Usage:   snapshots.Usage{Size: r.Usage.Size, Inodes: r.Usage.Inodes},
			Host:    r.Host,
			Content: r.Content,
		}
	}
	return storage.Import(ctx, out...)
}
