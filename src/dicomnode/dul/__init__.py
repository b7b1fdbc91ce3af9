"""The DICOM upper layer (PS3.8) and DIMSE command sets (PS3.7) for both roles.

One home for the protocol, named in the standard's words as pynetdicom names
it: :mod:`~dicomnode.dul.pdu` (PDUs and association items: A-ASSOCIATE-RQ/AC/RJ,
P-DATA-TF, A-RELEASE-RQ/RP, A-ABORT), :mod:`~dicomnode.dul.dimse` (command
sets: C-STORE, C-ECHO, and the N-ACTION/N-EVENT-REPORT fields storage
commitment will use), :mod:`~dicomnode.dul.meta` (Part 10 File Meta
Information, read and written) and :mod:`~dicomnode.dul.link` (the one
blocking PDU reader both the receiver SCP and the forwarder SCU read with).

Contract: pure byte handling except :mod:`~dicomnode.dul.link`, which reads
and writes a socket it is given (it never opens one). Imports the standard
library and pydicom only; never the receiver, the forwarder or the config.
Hand-written on purpose: P-DATA is the hot path of both transports (no
decoding of data set bytes, one reused buffer); the cold A-ASSOCIATE items are
checked against pynetdicom's public ``pdu`` classes in the unit tests.
"""
