"""The real data: a product's defects as a `datasets.Dataset` and the listings the tools need (`mvtec`), read from a
local folder in any dataset layout (`layouts`: MVTec AD, DefectFill2, VisA, MVTec AD 2, MVTec LOCO, BTAD,
KolektorSDD2, Real-IAD, a plain folder, a CSV table) or from `load_dataset`; masks as users have them
(`mask_files`); the paper's few-shot split (`split`), the paired image / mask transform of training (`transform`),
and synthesis folders read as the same Dataset (`synthetic`)."""
