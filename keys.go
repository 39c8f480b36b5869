package storage

// Layout of the bbolt engine: byte for byte containerd's, so a driver's
// existing metadata.db opens unchanged and a file written here opens in
// containerd.
//
//	v1/                                  bucket KeyVersion
//	  snapshots/                         bucket KeySnapshots, sequence = last ID
//	    <name>/                          bucket, one per snapshot
//	      id         uvarint ID
//	      kind       one byte, snapshots.Kind
//	      parent     parent name (absent without a parent)
//	      createdat  time.Time.MarshalBinary, UTC
//	      updatedat  time.Time.MarshalBinary, UTC
//	      labels/    bucket of label key -> value (absent without labels)
//	      inodes     varint, committed snapshots only
//	      size       varint, committed snapshots only
//	      parentids  uvarint chain of parent IDs, immediate parent first
//	                 (our addition: containerd ignores it; when absent the
//	                 chain is followed through the parents)
//	  parents/                           bucket KeyParents
//	    <uvarint parent ID> 0x00 <uvarint child ID> -> child name
//
// IDs come from the snapshots bucket's sequence, as in containerd: unique in
// the file and never reused.
const (
	KeyVersion   = "v1"
	KeySnapshots = "snapshots"
	KeyParents   = "parents"

	KeyID        = "id"
	KeyKind      = "kind"
	KeyParent    = "parent"
	KeyCreatedAt = "createdat"
	KeyUpdatedAt = "updatedat"
	KeyLabels    = "labels"
	KeyInodes    = "inodes"
	KeySize      = "size"
	KeyParentIDs = "parentids"
)
